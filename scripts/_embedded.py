"""A throwaway data dir for the benchmark scripts: the embedded PostgreSQL they start in it
is stopped, and the directory removed, when the block ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_data_dir(prefix: str) -> Iterator[Path]:
    data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Unix socket path
    try:
        yield data_dir
    finally:
        pidfile = data_dir / "pg" / "postmaster.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
            time.sleep(1)
        shutil.rmtree(data_dir, ignore_errors=True)
