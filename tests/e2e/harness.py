"""Runs the real ``upi-engine`` command as a subprocess and talks HTTP to it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support import free_port

UPI_ENGINE = str(Path(sys.executable).parent / "upi-engine")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPI_")}
    # Ordinary payers (not the SPEC §5 sandbox ones) are declined at their bank's business
    # decline rate (1-3.5 %, drawn per transaction id), so a test asserting an ordinary
    # payer's SUCCESS would fail now and then. Tests that want those declines set the scale.
    env.update(
        {
            "UPI_LOG_LEVEL": "INFO",
            "UPI_NPCI_MOCK_LATENCY_SCALE": "0.2",
            "UPI_NPCI_MOCK_DECLINE_SCALE": "0",
            **extra,
        }
    )
    return env


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
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
