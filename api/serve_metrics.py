"""``upi-engine serve`` counts its metrics across all its processes (``GET /metrics``).

A serve on the in-process bus answers HTTP from several processes (:mod:`api.processes`);
``/metrics`` from any of them must show the totals of all. prometheus_client does that in
its multiprocess mode: each process writes its values to memory-mapped files in the
directory ``PROMETHEUS_MULTIPROC_DIR`` names, and a scrape adds up the files
(:func:`core.metrics.exposition`). prometheus_client chooses where values live once, when
it is first imported (``prometheus_client.values.ValueClass``), and the CLI's imports
create every metric (:mod:`core.metrics`); so the choice is made here, imported by
:mod:`api.cli` before anything else of the engine.

Every ``serve`` (but its own extra gateway processes) gets a fresh, empty directory of its
own, ``$TMPDIR/upi-metrics-<pid>-XXXXXXXX``, removed when it exits; its extra gateway
processes (``serve --beside``) inherit the variable and write beside it. A serve that did
not exit normally (SIGKILL, or a signal left to its default action) leaves its directory
behind; the next serve removes those of processes no longer running. One process or
several, the engine's metrics are the same; the runtime's own (``process_*``,
``python_*``) are not exported in this mode, as they would describe only the process that
answered.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MULTIPROC_DIR", "share_serve_metrics"]

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "upi-metrics-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """The directories of serves that are gone (this user's only)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = path.name.removeprefix(_PREFIX).split("-", 1)[0]
        try:
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def share_serve_metrics(argv: Sequence[str]) -> str | None:
    """For ``upi-engine serve`` (``argv`` as ``sys.argv``): make and name the directory
    of its metrics; returns it. Other commands, and ``serve --beside``, keep what they
    were given."""
    if list(argv[1:2]) != ["serve"] or "--beside" in argv:
        return None
    _remove_stale()
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_DIR] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


if "prometheus_client" not in sys.modules:  # too late otherwise: keep per-process metrics
    share_serve_metrics(sys.argv)
