"""deploy/Dockerfile (CPU) and deploy/Dockerfile.cuda: no Docker engine here, so check what a build would do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKERFILES = {"cpu": REPO / "deploy" / "Dockerfile", "cuda": REPO / "deploy" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def index_of(steps: list[tuple[str, str]], pattern: str) -> int:
    return next(i for i, (_, args) in enumerate(steps) if re.search(pattern, args))


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_image_runs_the_slipstream_cli(flavour: str) -> None:
    steps = dict(instructions(DOCKERFILES[flavour]))
    assert json.loads(steps["ENTRYPOINT"]) == ["slipstream"]
    assert {"9400", "9401", "29600"} <= set(steps["EXPOSE"].split())
    # Nodes in containers must be scrapeable from outside the container.
    assert "SLIPSTREAM_TELEMETRY__HOST=0.0.0.0" in steps["ENV"]


@pytest.mark.parametrize(("flavour", "index"), [("cpu", "whl/cpu"), ("cuda", "CUDA_INDEX")])
def test_torch_is_installed_first_from_the_right_index(flavour: str, index: str) -> None:
    steps = instructions(DOCKERFILES[flavour])
    torch = index_of(steps, r"pip install torch==")
    assert index in steps[torch][1]
    assert torch < index_of(steps, r"pip install -r /tmp/requirements.txt") < index_of(steps, r"pip install --no-deps")
    # Sources come after the dependency layer, so that editing code does not reinstall dependencies.
    assert index_of(steps, r"requirements.txt") < next(
        i for i, (op, a) in enumerate(steps) if op == "COPY" and a == ". ."
    )


def test_cpu_image_pins_the_torch_the_makefile_installs() -> None:
    makefile_torch = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={makefile_torch}" in DOCKERFILES["cpu"].read_text()


@pytest.mark.parametrize(("flavour", "extras"), [("cpu", set()), ("cuda", {"gpu"})])
def test_requirements_step_lists_the_project_dependencies(flavour: str, extras: set[str], tmp_path: Path) -> None:
    # Run the image's own requirements one-liner against this repository's pyproject.toml.
    steps = instructions(DOCKERFILES[flavour])
    run = steps[index_of(steps, r"requirements.txt")][1]
    script = run.split("&&")[0].replace("python ", "python3 ", 1)
    assert "> /tmp/requirements.txt" in script
    script = script.replace("/tmp/requirements.txt", str(tmp_path / "requirements.txt"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=30)
    listed = (tmp_path / "requirements.txt").read_text().splitlines()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + [
        d for extra in sorted(extras) for d in project["optional-dependencies"][extra]
    ]
    assert listed == expected


def test_build_context_leaves_out_local_state() -> None:
    ignored = set((REPO / "deploy" / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "tests"} <= ignored
    cuda_ignore = REPO / "deploy" / "Dockerfile.cuda.dockerignore"
    assert cuda_ignore.read_text() == (REPO / "deploy" / "Dockerfile.dockerignore").read_text()
