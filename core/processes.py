"""Child processes of the engine's own tools (the DR drill, the benchmark): the
``upi-engine`` command beside this interpreter, free ports, and ``upi-engine serve`` started
and stopped as a process."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["UPI_ENGINE", "EngineProcess", "free_port"]

UPI_ENGINE = str(Path(sys.executable).parent / "upi-engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EngineProcess:
    """``upi-engine serve`` (or another server ``command`` with a ``/readyz``) on ``port``."""

    port: int
    env: dict[str, str]
    log: Path
    command: tuple[str, ...] = ()
    cwd: Path | None = None  # where it runs (and reads a .env file from)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process; do not wait for it (a warm standby engine waits itself)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                list(self.command) or [UPI_ENGINE, "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None, "spawn first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"engine not ready; see {self.log}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
