"""``upi-engine top`` against a running engine under load (issue 17, part 4): one window
of rates, latencies and gauges as JSON, the live screen in a terminal (tmux), and a clear
failure for an engine that is not there. The same engine's ``/metrics`` holds every metric
the Grafana dashboard queries (deploy/grafana). One engine, with a trickle of payments, for
the whole module."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard import SYNTHETIC, metric_names, queries
from tests.e2e.harness import UPI_ENGINE, Serve, cli, create_merchant, embedded_environment, serving
from tests.support import free_port

# Slow, and one worker runs the module: its tests share one busy engine.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TMUX = shutil.which("tmux")


@dataclass
class Busy:
    env: dict[str, str]
    server: Serve

    def metrics(self) -> str:
        return httpx.get(f"{self.server.url}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def busy() -> Iterator[Busy]:
    """An engine paid a steady trickle (some 15 payments a second) while the module runs."""
    with embedded_environment() as env, serving(env, ("all",)) as (server,):
        merchant = create_merchant(env)
        headers = {"Authorization": f"Bearer {merchant['api_key']}"}
        stop = threading.Event()

        def pay() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    client.post(
                        "/v1/payments",
                        headers={**headers, "Idempotency-Key": f"top-{n}"},
                        json={"payer_vpa": f"t{n}@ybl", "amount_paise": 500 + n,
                              "merchant_order_id": "top"},
                    )  # fmt: skip
                    n += 1
                    time.sleep(0.05)

        payer = threading.Thread(target=pay)
        payer.start()
        try:
            time.sleep(6)  # the gauges are set every 5 s
            yield Busy(env, server)
        finally:
            stop.set()
            payer.join()


def test_top_once_shows_the_engine_at_work(busy):
    server = busy.server
    done = cli(busy.env, "top", "--url", server.url, "--once", "--interval", "3", "--json")
    assert done.returncode == 0, done.stderr
    [engine] = json.loads(done.stdout)["engines"]
    assert engine["url"] == server.url
    assert engine["accepted_per_s"] > 0
    assert engine["accepted_p99_ms"] is not None and engine["accepted_p99_ms"] > 0
    assert sum(engine["final_per_s"].values()) > 0
    assert engine["http_5xx_per_s"] == 0
    assert "ledger" in engine["consumer_lag"] and len(engine["consumer_lag"]) >= 4
    assert engine["ledger_size"] > 0 and engine["ledger_valid"] in (True, None)
    assert engine["database_role"] == "primary"
    assert engine["deemed_payments"] == 0
    # Every consumer's dead letters, at 0 from its start.
    assert set(engine["dead_letters"]) == set(engine["consumer_lag"])
    assert set(engine["dead_letters"].values()) == {0}

    # The table, and an engine that is not there: exit 1, named as down.
    absent = f"http://127.0.0.1:{free_port()}"
    done = cli(busy.env, "top", "--url", server.url, "--url", absent, "--once",
               "--interval", "0.5", "--json")  # fmt: skip
    assert done.returncode == 1
    engines = {e["url"]: e for e in json.loads(done.stdout)["engines"]}
    assert "error" in engines[absent] and "accepted_per_s" in engines[server.url]
    table = cli(busy.env, "top", "--url", server.url, "--once", "--interval", "0.5")
    assert table.returncode == 0 and "accepted/s" in table.stdout


def _gauge(text: str, name: str) -> float:
    [value] = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]
    return float(value)


def _rows(screen: str) -> dict[str, str]:
    """The table's rows as {name: value}: Rich draws ``│ name │ value │`` per row, and a
    value too wide for its column goes on in the lines below, under an empty name."""
    rows: dict[str, str] = {}
    name = ""
    for line in screen.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) != 2:
            name = ""
        elif cells[0]:
            name = cells[0]
            rows[name] = cells[1]
        elif name and cells[1]:
            rows[name] += " " + cells[1]
    return rows


@contextlib.contextmanager
def _tmux(command: list[str], env: dict[str, str]) -> Iterator[list[str]]:
    """``command`` in a detached tmux session 120x40 on a tmux server of its own; yields
    the tmux command line to talk to it."""
    assert TMUX is not None
    tmux = [TMUX, "-L", f"upi-top-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "120", "-y", "40", "-s", "top", *command],
        env=env, check=True, timeout=10,
    )  # fmt: skip
    try:
        yield tmux
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, timeout=10, capture_output=True)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
def test_top_on_a_terminal_shows_the_figures(busy):
    server = busy.server
    env = {**busy.env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    command = [UPI_ENGINE, "top", "--url", server.url, "--interval", "1"]
    with _tmux(command, env) as tmux:
        deadline = time.monotonic() + 30
        rows: dict[str, str] = {}
        screen = ""
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "top"],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout  # fmt: skip
            rows = _rows(screen)
            # Past the first window (… until then), and a window in which payments came.
            if re.fullmatch(r"[0-9.]+", rows.get("accepted/s", "")) and float(rows["accepted/s"]):
                break
        else:
            raise AssertionError(f"top never showed a window of payments:\n{screen}")
        after = busy.metrics()
    assert "upi-engine top" in screen and server.url in screen
    assert float(rows["accepted/s"]) > 0
    assert "SUCCESS" in rows["final/s"]
    assert float(rows["5xx/s"]) == 0
    p50, p99 = (float(v) for v in rows["202 p50 / p99 ms"].split(" / "))
    assert 0 < p50 <= p99
    # Lag per consumer, as the engine names its consumers.
    lags = dict(re.findall(r"([a-z-]+) (\d+)", rows["consumer lag"]))
    for consumer in ("fraud-assessor", "npci-handler", "ledger", "settlement", "webhooks"):
        assert consumer in lags, rows["consumer lag"]
    # The gauges as the engine holds them: nothing deemed, no dead letter, its database the
    # primary; the ledger's size shown never ahead of the engine's (it only grows) and its
    # checkpoint age a figure.
    assert rows["deemed"] == "0" and _gauge(after, "upi_deemed_payments") == 0
    assert rows["dead letters"] == "0"
    assert rows["database"] == "primary" and _gauge(after, "upi_database_primary") == 1
    assert 0 < int(rows["ledger entries"]) <= _gauge(after, "upi_ledger_size")
    assert float(rows["checkpoint age s"]) >= 0
    assert rows["DR standbys"] == "—"  # the embedded default has none configured


def test_the_dashboard_queries_only_metrics_the_engine_exports(busy):
    exported = {
        s.name for family in text_string_to_metric_families(busy.metrics()) for s in family.samples
    }
    used = set().union(*(metric_names(q) for q in queries()))
    assert used, "the dashboard has no query?"
    missing = used - exported - SYNTHETIC
    assert not missing, f"the dashboard queries metrics the engine does not export: {missing}"
