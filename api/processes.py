"""Extra gateway processes of ``upi-engine serve`` (``UPI_GATEWAY_PROCESSES``).

One Python process is one core. On the in-process bus everything runs in the process with
every role; it starts more processes that only answer HTTP, on the same port: each
listens with ``SO_REUSEPORT`` and the kernel spreads connections over them. They write
payments and their events to the database; the first process relays and consumes them.
By default (``auto``) a serve with every role on the in-process bus runs one process per
CPU it may use, at most two (``core.config.AUTO_GATEWAY_PROCESSES``, and why).

Nothing a client sees depends on which process answers: ``/metrics`` adds up every
process's metrics (:mod:`api.serve_metrics`), and the rate limits are token buckets in the
database, shared by all (:mod:`api.ratelimit`).

They are children of that process: started after it has its database, stopped (SIGTERM,
then SIGKILL after 15 s) when it stops, and sent SIGTERM by the kernel if it dies
(``PR_SET_PDEATHSIG``), so none outlives it.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys

from core.processes import UPI_ENGINE

__all__ = ["listening_socket", "start_gateways", "stop_gateways"]

_log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_gateways(count: int, host: str, port: int) -> list[subprocess.Popen[bytes]]:
    command = [UPI_ENGINE, "serve", "--host", host, "--port", str(port)]
    command += ["--role", "gateway", "--beside"]
    children = []
    for _ in range(count):
        children.append(subprocess.Popen(command, preexec_fn=_die_with_parent))
    if children:
        _log.info("extra gateway processes", extra={"pids": [c.pid for c in children]})
    return children


def stop_gateways(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
