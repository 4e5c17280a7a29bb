from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.embedded import stop_embedded
from tests.e2e.harness import base_env
from tests.support import short_tmpdir, unique_name


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    """The embedded default: its own data dir, nothing else configured."""
    yield from _embedded_data_dir()


@pytest.fixture(scope="module")
def module_embedded_env() -> Iterator[dict[str, str]]:
    """The embedded default shared by one module's tests: for a module whose tests each
    use their own merchant and payers, so that one server can serve them all."""
    yield from _embedded_data_dir()


def _embedded_data_dir() -> Iterator[dict[str, str]]:
    data_dir = short_tmpdir("ue")
    yield base_env(UPI_DATA_DIR=str(data_dir))
    stop_embedded(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def distributed_env(db_url: str, kafka_bootstrap: str) -> dict[str, str]:
    """Distributed mode: a PostgreSQL URL and the Tansu broker (no idempotent producers)."""
    return base_env(
        UPI_DATABASE_URL=db_url,
        UPI_BUS="kafka",
        UPI_KAFKA_BOOTSTRAP=kafka_bootstrap,
        UPI_KAFKA_IDEMPOTENCE="false",
        UPI_KAFKA_TOPIC_PREFIX=unique_name("e2e"),
        UPI_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        UPI_DATA_DIR=str(Path("/tmp/unused-data-dir")),
    )
