"""The shipped Prometheus alert rules (deploy/prometheus/alerts.yml) pass ``promtool check
rules`` and their own ``promtool test rules`` cases (tests/prometheus/alerts_test.yml), and
alert only on metrics the engine exports (core/metrics.py)."""

from __future__ import annotations

import re

from core import metrics
from tests.support import DEPLOY, ROOT, promtool

RULES = DEPLOY / "prometheus" / "alerts.yml"
CASES = ROOT / "tests" / "prometheus" / "alerts_test.yml"


def test_rules_are_valid():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_fire_as_their_cases_say():
    done = promtool("test", "rules", str(CASES), cwd=CASES.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_upi_metric_an_alert_uses_is_exported():
    exported = {
        collector._name  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if hasattr(collector, "_name") and hasattr(collector, "_type")
    }
    used = set(re.findall(r"\b(upi_[a-z_]+?)(?:_total|_count|_bucket|_sum)?\b", RULES.read_text()))
    assert used, "no upi_ metric in the rules?"
    missing = {name for name in used if name not in exported}
    assert not missing, f"alerts on metrics the engine does not export: {sorted(missing)}"
