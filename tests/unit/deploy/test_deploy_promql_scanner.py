"""The PromQL name scanner the dashboard and alert checks rely on: it must find names, not hide them."""

from __future__ import annotations

from collections.abc import Callable

Scanner = Callable[[str], tuple[dict[str, set[str]], set[str]]]


def test_finds_series_matchers_and_grouping(promql: Scanner) -> None:
    used, grouping = promql(
        'sum by (stream, event) (rate(slipstream_bus_messages_total{job="learner", event=~"a|b"}[$__rate_interval]))'
    )
    assert used == {"slipstream_bus_messages_total": {"job", "event"}}
    assert grouping == {"stream", "event"}


def test_ignores_functions_numbers_keywords_and_label_values(promql: Scanner) -> None:
    used, _ = promql(
        'histogram_quantile(0.95, sum by (le) (rate(x_bucket{stream="up or down"}[5m]))) > 1e-3 '
        "and on() (count(up{job='r'} == 1) or on() vector(0)) < max_over_time((count(up == 1))[30m:1m])"
    )
    assert used == {"x_bucket": {"stream"}, "up": {"job"}}


def test_a_misspelled_metric_is_reported(promql: Scanner) -> None:
    used, _ = promql("time() - slipstream_learner_last_step_timestmp_seconds > 600")
    assert set(used) == {"slipstream_learner_last_step_timestmp_seconds"}
