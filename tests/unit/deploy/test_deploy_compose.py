"""docker-compose.yml: valid against the Compose spec, the services the issue asks for, commands the CLI accepts;
deploy/compose.acl.yml: the opt-in Redis ACL override, merged by docker-compose, each node on its own credential."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
# Services that run a Slipstream image: its entrypoint is `slipstream`, the service's command is the arguments.
NODE_SERVICES = sorted(name for name, s in SERVICES.items() if str(s.get("image", "")).startswith("slipstream:"))
LONG_RUNNING = sorted(name for name in SERVICES if name != "demo-model")
ACL_OVERRIDE = REPO / "deploy" / "compose.acl.yml"
# Services that log in to Redis -> their role (the Redis user).
ROLES = {"learner": "learner", "learner-gpu": "learner", "rollout": "rollout", "rollout-gpu": "rollout"}


def compose_schema() -> dict:
    # The Compose specification's JSON Schema, vendored (offline) by the check-jsonschema package.
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendored.joinpath("compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_valid_against_the_compose_spec_schema() -> None:
    assert schema_errors(COMPOSE) == []


def test_schema_check_rejects_a_broken_file() -> None:
    assert schema_errors({"services": {"redis": {"image": "redis", "helthcheck": {"test": ["CMD", "true"]}}}})
    assert schema_errors({"services": {"redis": {"image": "redis", "depends_on": {"x": {"condition": "healthy"}}}}})


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_docker_compose_config_accepts_each_profile(profile: str, tool: Callable[[str], str]) -> None:
    docker_compose = tool("docker-compose")
    result = subprocess.run(
        [docker_compose, "--profile", profile, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_keeps_its_data_in_an_append_only_file_on_a_volume() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[0] in COMPOSE["volumes"] and v.split(":")[1] == "/data" for v in redis["volumes"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    assert SERVICES[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}


def test_nodes_start_after_what_they_need_is_healthy() -> None:
    for name in NODE_SERVICES:
        for dependency, condition in SERVICES[name].get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == "demo-model" else "service_healthy"
            assert condition == {"condition": expected}, f"{name} -> {dependency}"
    for name in ("learner", "rollout", "learner-gpu", "rollout-gpu"):
        assert "redis" in SERVICES[name]["depends_on"], name
    assert "learner" in SERVICES["rollout"]["depends_on"] and "learner-gpu" in SERVICES["rollout-gpu"]["depends_on"]
    assert SERVICES["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_cpu_and_gpu_profiles() -> None:
    profiles = {name: set(s.get("profiles", [])) for name, s in SERVICES.items()}
    assert {n for n, p in profiles.items() if "cpu" in p} == {"demo-model", "learner", "rollout"}
    assert {n for n, p in profiles.items() if "gpu" in p} == {"learner-gpu", "rollout-gpu"}
    # Redis, Prometheus and Grafana serve both profiles.
    assert not profiles["redis"] and not profiles["prometheus"] and not profiles["grafana"]
    for name in ("learner-gpu", "rollout-gpu"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
        assert SERVICES[name]["image"] == "slipstream:cuda"
        assert SERVICES[name]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert "--rollout.engine" in SERVICES["rollout-gpu"]["command"]
    for name in ("demo-model", "learner", "rollout"):
        assert SERVICES[name]["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("name", ["rollout", "rollout-gpu"])
def test_rollout_services_scale(name: str) -> None:
    # `--scale rollout=N` fails on a fixed container name or a published host port.
    assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name]


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_service_command_is_accepted_by_the_slipstream_cli(
    name: str, check_command: Callable[[list[str]], bool]
) -> None:
    argv = SERVICES[name]["command"]
    if not check_command(argv):
        pytest.skip(f"`slipstream {argv[0]}` is not built yet: only its name was checked")


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_service_settings_name_real_config_fields(name: str, check_setting: Callable[[str], list[str]]) -> None:
    service = SERVICES[name]
    settings = [key for key in service.get("environment", {}) if key.startswith("SLIPSTREAM_")]
    settings += [arg for arg in service["command"] if arg.startswith("--") and "." in arg]
    assert [error for setting in settings for error in check_setting(setting)] == []


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_referenced_config_files_exist(name: str) -> None:
    command = SERVICES[name]["command"]
    if "--config" in command:
        config = command[command.index("--config") + 1]
        assert (REPO / config).is_file(), f"{name}: {config} is missing"


def test_dockerfiles_of_the_build_sections_exist() -> None:
    for name in NODE_SERVICES:
        assert (REPO / SERVICES[name]["build"]["context"] / SERVICES[name]["build"]["dockerfile"]).is_file(), name


def test_acl_override_is_valid_against_the_compose_spec_schema() -> None:
    assert schema_errors(yaml.safe_load(ACL_OVERRIDE.read_text())) == []


def merged_with_acl(profile: str, docker_compose: str) -> dict:
    """`docker-compose -f docker-compose.yml -f deploy/compose.acl.yml --profile P config`, parsed."""
    command = [docker_compose, "-f", "docker-compose.yml", "-f", str(ACL_OVERRIDE), "--profile", profile, "config"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def mounted(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_acl_override_loads_the_acl_file_in_redis_and_logs_each_node_in_as_its_role(
    profile: str, tool: Callable[[str], str], check_setting: Callable[[str], list[str]]
) -> None:
    merged = merged_with_acl(profile, tool("docker-compose"))
    assert schema_errors(merged) == []
    services, secrets = merged["services"], merged["secrets"]
    # Every secret is a file of the git-ignored secrets/ folder the commands in the override's header write.
    assert {name: Path(s["file"]).relative_to(REPO).as_posix() for name, s in secrets.items()} == {
        "redis-acl": "secrets/users.acl",
        "redis-status": "secrets/status",
        "redis-learner": "secrets/learner",
        "redis-rollout": "secrets/rollout",
    }
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--aclfile") + 1] == "/run/secrets/redis-acl"
    assert command[command.index("--appendonly") + 1] == "yes"  # the main file's persistence kept
    assert mounted(redis) == {"redis-acl", "redis-status"}
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "/run/secrets/redis-status" in test[1] and "--user status" in test[1]
    # docker-compose 1.x lists every service; Compose v2 only the profile's (and the profile-less ones).
    assert {name for name in ROLES if name.endswith("-gpu") == (profile == "gpu")} <= set(services)
    for name in (name for name in ROLES if name in services):
        env, role = services[name]["environment"], ROLES[name]
        assert env["SLIPSTREAM_BUS__USERNAME"] == role, name
        assert env["SLIPSTREAM_BUS__PASSWORD_FILE"] == f"/run/secrets/redis-{role}", name
        assert mounted(services[name]) == {f"redis-{role}"}, name  # its own password, nothing else
        assert env["SLIPSTREAM_BUS__URL"] == "redis://redis:6379", name  # the main file's settings kept
        assert [error for setting in env for error in check_setting(setting)] == []
