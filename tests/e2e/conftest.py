from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import base_env, embedded_environment
from tests.support import unique_name


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    """The embedded default: its own data dir, nothing else configured."""
    with embedded_environment() as env:
        yield env


@pytest.fixture(scope="module")
def module_embedded_env() -> Iterator[dict[str, str]]:
    """The embedded default shared by one module's tests: for a module whose tests each
    use their own merchant and payers, so that one server can serve them all."""
    with embedded_environment() as env:
        yield env


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
