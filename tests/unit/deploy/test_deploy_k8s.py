"""deploy/k8s/: valid against the Kubernetes schemas (offline, strict), and wired the way docs/operations.md says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
DOCS = [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
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
