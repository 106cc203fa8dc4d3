"""deploy/k8s/: valid against the Kubernetes schemas (offline, strict), and wired the way docs/operations.md says;
deploy/k8s-acl/: the opt-in Redis ACL overlay, its patches applied here (and by `kubectl kustomize` where kubectl is
installed), valid the same way and wired so that each pod holds only its own role's credential."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bus.acl import render, user_names, write_passwords
from bus.config import BusConfig

REPO = Path(__file__).resolve().parents[3]
KUSTOMIZATION = "kustomization.yaml"  # kubectl apply -k's index of the folder, not a Kubernetes object
MANIFESTS = sorted(p for p in (REPO / "deploy" / "k8s").glob("*.yaml") if p.name != KUSTOMIZATION)
DOCS = [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
ACL = REPO / "deploy" / "k8s-acl"
ACL_KUSTOMIZATION = yaml.safe_load((ACL / KUSTOMIZATION).read_text())
# Pods that log in to Redis -> their role (the Redis user); Redis' own pod logs in as `status` for its probe.
ROLES = {("Job", "slipstream-learner"): "learner", ("Deployment", "slipstream-rollout"): "rollout"}
# The oldest Kubernetes still commonly run and the newest schema the package ships.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]


def find(kind: str, name: str) -> dict:
    return next(doc for _, doc in DOCS if doc["kind"] == kind and doc["metadata"]["name"] == name)


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict) -> dict:
    (only,) = pod_spec(doc)["containers"]
    return only


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("file", "doc"), DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_manifest_is_valid_against_the_kubernetes_schema(file: str, doc: dict, version: str) -> None:
    # strict: unknown fields are errors too (a misspelled key is otherwise silently dropped by the API server).
    kubernetes_validate.validate(doc, version, strict=True)


def test_schema_check_rejects_a_misspelled_field() -> None:
    broken = yaml.safe_load(yaml.safe_dump(find("Deployment", "slipstream-rollout")))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = broken["spec"]["template"]["spec"]["containers"][
        0
    ].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_redis_is_a_statefulset_with_persistent_append_only_storage() -> None:
    redis = find("StatefulSet", "slipstream-redis")
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container(redis)["volumeMounts"]
    assert redis["spec"]["serviceName"] == "slipstream-redis"
    assert find("ConfigMap", "slipstream-env")["data"]["SLIPSTREAM_BUS__URL"] == "redis://slipstream-redis:6379"


def test_learner_is_an_indexed_job_whose_rendezvous_and_broadcast_are_pod_zero() -> None:
    job = find("Job", "slipstream-learner")
    assert job["spec"]["completionMode"] == "Indexed"
    args = container(job)["args"]
    nnodes = int(args[args.index("--learner.nnodes") + 1])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes > 1
    # Pod i of an Indexed Job with a subdomain is <job>-<i>.<subdomain>; the headless Service of that name gives DNS.
    subdomain = pod_spec(job)["subdomain"]
    service = find("Service", subdomain)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_zero = f"{job['metadata']['name']}-0.{subdomain}"
    assert args[args.index("--learner.rdzv_endpoint") + 1] == f"{pod_zero}:29500"
    env = find("ConfigMap", "slipstream-env")["data"]
    assert env["SLIPSTREAM_BROADCAST__MASTER_ADDR"] == env["SLIPSTREAM_WEIGHTS__MASTER_ADDR"] == pod_zero
    ports = {p["containerPort"] for p in container(job)["ports"]}
    assert {9400, 29500, 29600} <= ports


@pytest.mark.parametrize(
    ("kind", "name", "gpus"), [("Job", "slipstream-learner", 8), ("Deployment", "slipstream-rollout", 1)]
)
def test_nodes_request_gpus_and_announce_their_metrics(kind: str, name: str, gpus: int) -> None:
    workload = find(kind, name)
    resources = container(workload)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    port = int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert port in {p["containerPort"] for p in container(workload)["ports"]}
    env = {e["name"]: e["value"] for e in container(workload)["env"]}
    assert int(env["SLIPSTREAM_TELEMETRY__PORT"]) == port
    assert container(workload)["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_services_select_the_pods_they_front() -> None:
    pods = [doc["spec"]["template"]["metadata"]["labels"] for _, doc in DOCS if "template" in doc.get("spec", {})]
    for _, doc in DOCS:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"].items()
            assert any(selector <= labels.items() for labels in pods), doc["metadata"]["name"]


def test_prometheus_discovers_the_headless_services() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    names = {
        job["job_name"]: job["dns_sd_configs"][0]["names"]
        for job in config["scrape_configs"]
        if "dns_sd_configs" in job
    }
    assert "slipstream-learner" in names["learner"] and "slipstream-rollout" in names["rollout"]
    assert find("Service", "slipstream-rollout")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(("kind", "name"), [("Job", "slipstream-learner"), ("Deployment", "slipstream-rollout")])
def test_container_command_and_settings(
    kind: str, name: str, check_command: Callable[[list[str]], bool], check_setting: Callable[[str], list[str]]
) -> None:
    node = container(find(kind, name))
    settings = [e["name"] for e in node["env"]] + list(find("ConfigMap", "slipstream-env")["data"])
    settings += [arg for arg in node["args"] if arg.startswith("--") and "." in arg]
    assert [error for setting in settings for error in check_setting(setting)] == []
    if not check_command(node["args"]):
        pytest.skip(f"`slipstream {node['args'][0]}` is not built yet: only its name and settings were checked")


def test_the_base_kustomization_lists_every_manifest() -> None:
    base = yaml.safe_load((REPO / "deploy" / "k8s" / KUSTOMIZATION).read_text())
    assert sorted(base["resources"]) == [path.name for path in MANIFESTS]


def json_patch(doc: dict, ops: list[dict[str, Any]]) -> dict:
    """RFC 6902 `add` and `replace` (what the overlay's patches use), as kustomize applies them."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if last == "-":
                node.append(op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            assert (last in node) == (op["op"] == "replace"), f"{op['path']}: {op['op']} on a missing/present key"
            node[last] = op["value"]
    return doc


def overlaid() -> list[dict]:
    """The base objects with the overlay's patches applied (the generated Secrets left out)."""
    docs = [copy.deepcopy(doc) for _, doc in DOCS]
    for patch in ACL_KUSTOMIZATION["patches"]:
        target = (patch["target"]["kind"], patch["target"]["name"])
        [index] = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == target]
        docs[index] = json_patch(docs[index], yaml.safe_load((ACL / patch["path"]).read_text()))
    return docs


def generated_secrets() -> dict[str, dict[str, str]]:
    """secretGenerator: Secret name -> {key: file under deploy/k8s-acl/}."""
    return {
        g["name"]: dict(f.split("=", 1) if "=" in f else (Path(f).name, f) for f in g["files"])
        for g in ACL_KUSTOMIZATION["secretGenerator"]
    }


def secret_mounts(doc: dict) -> dict[str, str]:
    """Mount path -> Secret name, for the Secret volumes of a workload's only container."""
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec(doc).get("volumes", []) if "secret" in v}
    return {m["mountPath"]: volumes[m["name"]] for m in container(doc)["volumeMounts"] if m["name"] in volumes}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_acl_overlay_gives_valid_manifests(version: str) -> None:
    for doc in overlaid():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_acl_overlay_secrets_hold_the_rendered_file_and_only_the_in_cluster_passwords() -> None:
    assert ACL_KUSTOMIZATION["resources"] == ["../k8s"]
    secrets = generated_secrets()
    assert secrets == {
        "slipstream-redis-acl": {"users.acl": "secrets/users.acl"},
        "slipstream-redis-status": {"password": "secrets/status"},
        "slipstream-redis-learner": {"password": "secrets/learner"},
        "slipstream-redis-rollout": {"password": "secrets/rollout"},
    }  # admin and producer-* stay with operators and agents


def test_acl_overlay_redis_loads_the_file_and_probes_as_status() -> None:
    redis = next(d for d in overlaid() if d["kind"] == "StatefulSet")
    args = container(redis)["args"]
    acl_file = Path(args[args.index("--aclfile") + 1])
    mounts = secret_mounts(redis)
    assert mounts[str(acl_file.parent)] == "slipstream-redis-acl" and acl_file.name == "users.acl"
    probe = " ".join(container(redis)["readinessProbe"]["exec"]["command"])
    status_dir = next(path for path, secret in mounts.items() if secret == "slipstream-redis-status")
    assert f"$(cat {status_dir}/password)" in probe and "--user status" in probe and "grep -q PONG" in probe
    modes = {v["secret"]["secretName"]: v["secret"]["defaultMode"] for v in pod_spec(redis)["volumes"]}
    assert modes == {"slipstream-redis-acl": 0o444, "slipstream-redis-status": 0o400}  # redis runs as uid 999


@pytest.mark.parametrize(("kind", "name"), sorted(ROLES))
def test_acl_overlay_nodes_log_in_as_their_role_from_their_own_password_file(
    kind: str, name: str, check_setting: Callable[[str], list[str]]
) -> None:
    role = ROLES[(kind, name)]
    workload = next(d for d in overlaid() if (d["kind"], d["metadata"]["name"]) == (kind, name))
    env = {e["name"]: e.get("value") for e in container(workload)["env"]}
    assert env["SLIPSTREAM_BUS__USERNAME"] == role
    password = Path(env["SLIPSTREAM_BUS__PASSWORD_FILE"])
    assert secret_mounts(workload) == {str(password.parent): f"slipstream-redis-{role}"}  # its own, nothing else
    assert generated_secrets()[f"slipstream-redis-{role}"] == {password.name: f"secrets/{role}"}
    assert [error for setting in env for error in check_setting(setting)] == []
    # The image runs as uid/gid 10001; the file is 0440 owned by root:fsGroup.
    assert pod_spec(workload)["securityContext"]["fsGroup"] == 10001
    [mode] = [v["secret"]["defaultMode"] for v in pod_spec(workload)["volumes"] if "secret" in v]
    assert mode == 0o440


def test_kubectl_kustomize_builds_the_acl_overlay_into_valid_objects(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # not a Debian package, so `make test` cannot install it; the patches are applied above too
        pytest.skip("kubectl is not installed: `kubectl kustomize` was not run")
    shutil.copytree(REPO / "deploy" / "k8s", tmp_path / "k8s")
    shutil.copytree(ACL, tmp_path / "k8s-acl")
    secrets = tmp_path / "k8s-acl" / "secrets"
    write_passwords(secrets, user_names())
    (secrets / "users.acl").write_text(render(BusConfig(), secrets))
    out = subprocess.run([kubectl, "kustomize", str(tmp_path / "k8s-acl")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    for doc in built:
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    names = {doc["metadata"]["name"] for doc in built if doc["kind"] == "Secret"}
    # Hash-suffixed names, and every reference rewritten to them.
    assert {name.rsplit("-", 1)[0] for name in names} == set(generated_secrets())
    referenced = {
        v["secret"]["secretName"] for doc in built if "template" in doc.get("spec", {})
        for v in pod_spec(doc).get("volumes", []) if "secret" in v
    }  # fmt: skip
    assert referenced == names
