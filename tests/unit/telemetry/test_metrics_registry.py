"""Every metric in telemetry.metrics follows the naming rules and is listed in the module's docstring table."""

from __future__ import annotations

import re

import prometheus_client
import pytest
from prometheus_client.metrics_core import Metric

from telemetry import metrics
from telemetry.metrics import REGISTRY

# Labels whose values come from small fixed sets; anything per-id (trajectory, task, node) would explode series.
LOW_CARDINALITY_LABELS = {"stream", "event", "transport", "group", "reason", "side", "function", "outcome"}
NODE_INFO_LABELS = {"node_id", "role", "version"}
NON_BASE_UNITS = {"ms", "milliseconds", "minutes", "hours", "kb", "mb", "gb", "kib", "mib", "percent", "bits"}


def families() -> list[Metric]:
    return list(REGISTRY.collect())


def exposed_name(family: Metric) -> str:
    """The name Prometheus sees: prometheus_client strips `_total` from counter families and `_info` from infos."""
    suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
    return family.name + suffix


def test_registry_is_isolated_from_the_global_default() -> None:
    ours = {exposed_name(f) for f in families()}
    theirs = {exposed_name(f) for f in prometheus_client.REGISTRY.collect()}
    assert REGISTRY is not prometheus_client.REGISTRY
    assert "slipstream_learner_step" in ours
    assert not {n for n in theirs if n.startswith("slipstream_")}


def declared_labels(family: Metric) -> set[str]:
    """Label names a metric was declared with (known even before any labelled series exists)."""
    if family.type == "info":
        return NODE_INFO_LABELS  # an Info's labels are its value, set by set_node_info
    return set(REGISTRY._names_to_collectors[exposed_name(family)]._labelnames)  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", families(), ids=exposed_name)
def test_name_follows_conventions(family: Metric) -> None:
    name = exposed_name(family)
    words = name.split("_")
    assert name.startswith("slipstream_"), "every metric carries the slipstream_ prefix"
    assert not NON_BASE_UNITS & set(words), "base units only: seconds, bytes, ratios"
    base = name.removesuffix("_total")
    assert (family.type == "counter") == name.endswith("_total"), "_total on counters and only on counters"
    if {"duration", "latency", "timestamp", "wait", "time"} & set(words):
        assert base.endswith("_seconds"), "times are in seconds"
    if {"bytes", "size"} & set(words):
        assert base.endswith("_bytes"), "sizes are in bytes"
    if {"ratio", "fraction", "accuracy"} & set(words):
        assert base.endswith("_ratio"), "fractions are ratios in 0..1 named _ratio"
    if family.type == "histogram":
        assert re.search(r"_(seconds|versions|reward)$", name), "a histogram names what it buckets"


@pytest.mark.parametrize("family", families(), ids=exposed_name)
def test_labels_are_low_cardinality(family: Metric) -> None:
    labels = declared_labels(family)
    if family.type != "info":
        assert labels <= LOW_CARDINALITY_LABELS, f"{exposed_name(family)} has per-instance labels {labels}"


def test_docstring_table_lists_every_metric_with_its_type_and_labels() -> None:
    rows = re.findall(r"^\| (slipstream_\w+) +\| (\w+) +\| ([\w, ]*?) *\|$", metrics.__doc__ or "", re.MULTILINE)
    table = {name: (kind, {label for label in labels.split(", ") if label}) for name, kind, labels in rows}
    assert table == {exposed_name(f): (f.type, declared_labels(f)) for f in families()}


def test_staleness_buckets_are_one_per_version_up_to_16() -> None:
    (family,) = metrics.LEARNER_STALENESS.collect()
    bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
    assert bounds == [f"{v}.0" for v in range(17)] + ["+Inf"]


def test_known_drop_reasons_and_clip_sides_exist_before_the_first_event() -> None:
    for reason in metrics.DROP_REASONS:
        assert REGISTRY.get_sample_value("slipstream_learner_dropped_samples_total", {"reason": reason}) is not None
    for side in ("low", "high"):
        assert REGISTRY.get_sample_value("slipstream_learner_clip_ratio", {"side": side}) is not None


def test_node_info_is_one_series_with_identity_labels() -> None:
    metrics.set_node_info("rollout-3", "rollout", "9.9.9")
    metrics.set_node_info("rollout-3", "rollout")
    samples = [s for f in families() if f.name == "slipstream_node" for s in f.samples]
    assert len(samples) == 1
    assert samples[0].value == 1.0
    assert samples[0].labels["node_id"] == "rollout-3"
    assert samples[0].labels["role"] == "rollout"
    assert samples[0].labels["version"] not in ("", "9.9.9")  # the installed package's version
