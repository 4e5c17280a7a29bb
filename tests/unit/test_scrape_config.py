"""The example scrape configuration (deploy/prometheus/prometheus.yml) is valid for
Prometheus (``promtool check config``, which also checks the rule files it names), wires
the shipped alert rules, and has a job for every role ``serve --role`` takes and for the
mock switch run apart, each matched by the UpiEngineDown alert as it should be."""

from __future__ import annotations

import re
from typing import Any

import yaml

from api.bootstrap import Role
from tests.support import DEPLOY, promtool

CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"


def _config() -> dict[str, Any]:
    loaded = yaml.safe_load(CONFIG.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _roles_by_job() -> dict[str, set[str]]:
    return {
        job["job_name"]: {
            target["labels"]["role"] for target in job["static_configs"] if "labels" in target
        }
        for job in _config()["scrape_configs"]
    }


def test_promtool_accepts_the_config_and_its_rule_files():
    done = promtool("check", "config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr


def test_the_config_wires_the_shipped_alert_rules():
    assert [(CONFIG.parent / f).resolve() for f in _config()["rule_files"]] == [RULES.resolve()]


def test_every_role_and_the_mock_switch_has_a_job_labelled_with_it():
    jobs = _roles_by_job()
    roles = {role for labels in jobs.values() for role in labels}
    assert roles == {r.value for r in Role} | {"npci-mock"}
    for job, labels in jobs.items():
        assert len(labels) == 1, f"{job}: one role per job, got {labels}"
        [role] = labels
        expected = "upi-npci-mock" if role == "npci-mock" else f"upi-engine-{role}"
        assert job == expected


def test_the_engine_down_alert_covers_every_engine_job_and_not_the_mock_switch():
    rule = next(
        r
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for r in group["rules"]
        if r.get("alert") == "UpiEngineDown"
    )
    [pattern] = re.findall(r'up\{job=~"([^"]+)"\}', rule["expr"])
    for job, [role] in _roles_by_job().items():
        assert bool(re.fullmatch(pattern, job)) == (role != "npci-mock"), job
