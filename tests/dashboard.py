"""The shipped Grafana dashboard (deploy/grafana/upi-engine.json), read for the tests: its
panels' PromQL queries and the metric names they select."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "upi-engine.json"
# Series Prometheus makes itself for every target, not in any /metrics.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "bool", "offset", "inf", "nan"}
)  # fmt: skip


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def for_promtool(expr: str) -> str:
    """A query with Grafana's variables given values, as Prometheus would get it."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL query selects (not its functions, label names or values,
    keywords, durations or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', for_promtool(expr))  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names
