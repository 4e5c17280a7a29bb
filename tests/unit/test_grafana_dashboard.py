"""The shipped Grafana dashboard (deploy/grafana/upi-engine.json) has the shape Grafana
imports, every panel queries the Prometheus data source it names, its queries are valid
PromQL (``promtool check rules`` parses them as recording rules) and they cover what an
operator looks at first (issue 17). That they name only metrics the engine exports is
checked against a live engine's /metrics in tests/e2e/test_top_e2e.py."""

from __future__ import annotations

import yaml

from tests.dashboard import dashboard, for_promtool, metric_names, panels, queries
from tests.support import promtool

# What the dashboard must show: a metric each (issue 17's list, SPEC §10).
SHOWN = {
    "upi_payments_initiated_total",  # accepted/s
    "upi_payments_final_total",  # settled/s
    "upi_http_request_seconds_bucket",  # 202 p50/p99
    "upi_http_request_seconds_count",  # 5xx rate
    "upi_consumer_lag",
    "upi_dead_letters_total",
    "upi_deemed_payments",
    "upi_ledger_checkpoint_age_seconds",
    "upi_outbox_backlog",
    "upi_switch_latency_seconds_bucket",
    "upi_switch_breaker_state",
    "upi_tat_breaches",
    "upi_database_primary",  # DR role
    "upi_dr_standbys_streaming",
}


def test_the_dashboard_has_grafanas_shape():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    [source] = board["templating"]["list"]
    assert (source["type"], source["query"], source["name"]) == (
        "datasource",
        "prometheus",
        "datasource",
    )
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        assert panel["type"] in {"timeseries", "stat", "state-timeline"}, panel["type"]
        assert panel["title"] and panel["targets"], panel
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and 0 <= grid["x"] < grid["x"] + grid["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"])


def test_every_query_is_valid_promql(tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": for_promtool(q)}
                    for n, q in enumerate(queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_it_shows_what_an_operator_looks_at_first():
    used = set().union(*(metric_names(q) for q in queries()))
    assert used >= SHOWN, sorted(SHOWN - used)


def test_metric_names_are_read_from_promql_as_prometheus_would():
    query = (
        "histogram_quantile(0.99, sum by (le, bank) (rate(upi_switch_latency_seconds_bucket"
        '{operation="pay", bank=~"up.*"}[$__rate_interval]))) / on (bank) group_left up'
    )
    assert metric_names(query) == {"upi_switch_latency_seconds_bucket", "up"}
    assert metric_names("sum(rate(a_total[5m])) > bool 0.5 and b offset 5m") == {"a_total", "b"}
