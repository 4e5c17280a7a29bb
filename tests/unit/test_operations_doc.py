"""docs/operations.md names only what exists: every metric it names is one the engine (or
the mock switch) exports, every ``upi-engine`` command it shows is a command with the
options it is given, and every alert it explains is a shipped rule, each one explained."""

from __future__ import annotations

import re
from typing import Any

import typer
import yaml

from api.cli import app
from core import metrics
from tests.support import DEPLOY, ROOT

DOC = (ROOT / "docs" / "operations.md").read_text()


def _exported() -> set[str]:
    names = {
        collector._name  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if hasattr(collector, "_name") and hasattr(collector, "_type")
    }
    return names | {"npci_mock_api_violations"}  # the mock switch's (npcisim)


def test_every_metric_it_names_is_exported():
    named = set(re.findall(r"\b((?:upi|npci_mock)_[a-z_]+?)(?:_total|_count|_bucket|_sum)?\b", DOC))
    assert len(named) > 15, named
    missing = named - _exported()
    assert not missing, f"docs/operations.md names metrics nobody exports: {sorted(missing)}"


def _invocations() -> list[list[str]]:
    """Each ``upi-engine …`` command line of the doc (code blocks and inline code), as words
    up to a comment, a pipe, a closing parenthesis or quote, or the end of the code."""
    spans = re.findall(r"```[a-z]*\n(.*?)```", DOC, re.S) + re.findall(r"`([^`\n]+)`", DOC)
    found = []
    for span in spans:
        for line in span.splitlines():
            for m in re.finditer(r"upi-engine ([^#|`)\"]*)", line):
                words = m.group(1).split()
                if words:
                    found.append(words)
    return found


def test_every_command_it_shows_exists_with_those_options():
    root = typer.main.get_command(app)  # a click group (typer's own copy of click)
    shown = _invocations()
    assert len(shown) > 10, shown
    for words in shown:
        command: Any = root
        rest = list(words)
        while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
            name = rest.pop(0)
            assert name in command.commands, f"no command: upi-engine {' '.join(words)}"
            command = command.commands[name]
        assert not hasattr(command, "commands"), f"a group, not a command: {words}"
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        used = {w.strip("[]…") for w in rest if w.lstrip("[").startswith("--")}
        unknown = used - options
        assert not unknown, f"upi-engine {' '.join(words)}: no option {sorted(unknown)}"


def test_every_shipped_alert_is_explained_and_no_other():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    shipped = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    explained = set(re.findall(r"^\| `(Upi\w+)`", DOC, re.M))
    assert explained == shipped
