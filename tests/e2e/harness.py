"""Runs the real ``upi-engine`` command as a subprocess and talks HTTP to it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from core.embedded import stop_embedded
from tests.support import free_port, kill_process, short_tmpdir, stop_process

UPI_ENGINE = str(Path(sys.executable).parent / "upi-engine")


# NPCI's whole timetable (UPI_NPCI_TIME_SCALE) five times as fast: the pay leg in 3 s, the
# first check-status of a deemed payment 18 s after it (NPCI's 90 s), the mock switch's
# check-status rule on the same scale. For tests that wait for payments deemed by a fault
# (a crash, a lost database) to be resolved.
NPCI_FIVE_TIMES_FASTER = {"UPI_NPCI_TIME_SCALE": "0.2"}
# For fault tests: a payment caught in a fault goes through NPCI's check-status plan
# (90 s, 300 s, 900 s): 4.5 s, 15 s and 45 s here, instead of minutes.
NPCI_TWENTY_TIMES_FASTER = {"UPI_NPCI_TIME_SCALE": "0.05"}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPI_")}
    # Ordinary payers (not the SPEC §5 sandbox ones) are declined at their bank's business
    # decline rate (1-3.5 %, drawn per transaction id), so a test asserting an ordinary
    # payer's SUCCESS would fail now and then. Tests that want those declines set the scale.
    # One HTTP process per serve (the default, auto, is one per CPU): the suite runs many
    # serves side by side; tests of several processes ask for them.
    env.update(
        {
            "UPI_LOG_LEVEL": "INFO",
            "UPI_GATEWAY_PROCESSES": "1",
            "UPI_NPCI_MOCK_LATENCY_SCALE": "0.2",
            "UPI_NPCI_MOCK_DECLINE_SCALE": "0",
            **extra,
        }
    )
    return env


@contextlib.contextmanager
def embedded_environment() -> Iterator[dict[str, str]]:
    """The embedded default: its own data dir, nothing else configured; the data dir's
    server stopped and the dir removed at the end."""
    data_dir = short_tmpdir("ue")
    try:
        yield base_env(UPI_DATA_DIR=str(data_dir))
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UPI_ENGINE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def create_merchant(env: dict[str, str], vpa: str = "shop@okicici", *extra: str) -> dict[str, Any]:
    done = cli(env, "merchant", "create", "--name", "Test Shop", "--vpa", vpa, "--json", *extra)
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = orjson.loads(done.stdout)
    return created


class Serve:
    """One ``upi-engine serve`` process."""

    def __init__(self, env: dict[str, str], roles: Sequence[str] = ("all",)) -> None:
        self.env = env
        self.roles = roles
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])

    def command(self) -> list[str]:
        if list(self.roles) == ["npci-mock"]:
            return [UPI_ENGINE, "npci-mock", "--port", str(self.port)]
        args = [UPI_ENGINE, "serve", "--port", str(self.port)]
        for role in self.roles:
            args += ["--role", role]
        return args

    def start(self, timeout: float = 60) -> Serve:
        args = self.command()
        ready = "/healthz" if list(self.roles) == ["npci-mock"] else "/readyz"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{ready}", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"serve not ready:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, 20)


@contextlib.contextmanager
def serving(env: dict[str, str], *role_sets: Sequence[str]) -> Iterator[list[Serve]]:
    servers = [Serve(env, roles) for roles in role_sets]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in reversed(servers):
            s.stop()


def wait_final(
    client: httpx.Client, txn: str, headers: dict[str, str], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/payments/{txn}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in {"SUCCESS", "FAILED", "BLOCKED", "REVERSED"}:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{txn} not final: {body}")


def query(env: dict[str, str], sql: str) -> list[tuple[Any, ...]]:
    """Read the engine's database (the URL comes from ``upi-engine db url``)."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from core.storage import asyncpg_url

    url = env.get("UPI_DATABASE_URL") or cli(env, "db", "url").stdout.strip()

    async def run() -> list[tuple[Any, ...]]:
        engine = create_async_engine(asyncpg_url(url))
        try:
            async with engine.begin() as conn:  # commits: tests also tamper through it
                return [tuple(r) for r in (await conn.execute(text(sql))).all()]
        finally:
            await engine.dispose()

    return asyncio.run(run())


Answers = dict[int, "httpx.Response | None"]


def only_202_or_503(answers: Answers, codes: set[str]) -> Counter[int]:
    """What clients got while a dependency failed: 202, or 503 with one of ``codes`` and a
    ``Retry-After``, never a 500 (0 counts requests that got no answer at all)."""
    statuses = Counter(r.status_code if r is not None else 0 for r in answers.values())
    assert set(statuses) <= {0, 202, 503}, f"a fault gave something else than 202/503: {statuses}"
    for r in answers.values():
        if r is not None and r.status_code == 503:
            assert r.json()["code"] in codes and "Retry-After" in r.headers, r.text
    return statuses


def retry_until_accepted(
    url: str,
    api_key: str,
    answers: Answers,
    body: Callable[[int], dict[str, Any]],
    key: Callable[[int], str],
    attempts: int = 40,
) -> dict[int, str]:
    """The merchant retries each request that got no 202 with the same Idempotency-Key
    (the merchant guide's rule) until it does; returns each request's transaction id."""
    accepted: dict[int, str] = {}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for n, r in answers.items():
            for _ in range(attempts):
                if r is not None and r.status_code == 202:
                    break
                time.sleep(0.5)
                r = client.post(
                    "/v1/payments", json=body(n), headers={**headers, "Idempotency-Key": key(n)}
                )
            assert r is not None and r.status_code == 202, r.text if r is not None else n
            accepted[n] = r.json()["transaction_id"]
    return accepted
