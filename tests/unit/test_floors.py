"""Imports only go down the floors of docs/architecture.md; the two nodes never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"envs", "telemetry", "bus", "weight_broadcast", "rollout_node", "learner_node", "slipstream", "bench"}
ALLOWED = {
    "envs": set(),
    "telemetry": set(),
    "bus": {"telemetry"},
    "weight_broadcast": {"bus", "telemetry"},
    "rollout_node": {"bus", "telemetry", "envs", "weight_broadcast"},
    "learner_node": {"bus", "telemetry", "envs", "weight_broadcast"},
    "slipstream": OURS,  # the command imports every floor (and `slipstream bench` loads bench/)
    "bench": OURS,  # benchmarks, like tests, stand beside the command on the top floor
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_go_down(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in wrong.items() if v} == {}
