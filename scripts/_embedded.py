"""A throwaway data dir for the benchmark scripts: the embedded PostgreSQL they start in it
is stopped, and the directory removed, when the block ends."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.embedded import stop_embedded


@contextlib.contextmanager
def scratch_data_dir(prefix: str) -> Iterator[Path]:
    data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Unix socket path
    try:
        yield data_dir
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
