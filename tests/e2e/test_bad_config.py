"""A bad value stops the process at start with one clear line naming the variable, exit 2."""

import pytest

from tests.e2e.harness import base_env, cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("variable", "value", "args"),
    [
        ("UPI_BUS", "rabbitmq", ["serve"]),
        ("UPI_ENV", "staging", ["serve"]),
        ("UPI_INTERNAL_PORT", "metrics", ["serve"]),
        ("UPI_DATABASE_URL", "mysql://db/upi", ["serve"]),
        ("UPI_KAFKA_PARTITIONS", "zero", ["db", "url"]),
        ("UPI_MASTER_KEY", "c2hvcnQ=", ["serve"]),
        ("UPI_CATEGORY_DAILY_LIMITS_PAISE", '{"jewelry": 100}', ["serve"]),
        ("UPI_RELAY_BATCH_SIZE", "-5", ["merchant", "create", "--name", "x", "--vpa", "shop@ybl"]),
    ],
)
def test_bad_configuration_exits_2_with_one_line(tmp_path, variable, value, args):
    env = base_env(UPI_DATA_DIR=str(tmp_path / "d"), **{variable: value})
    done = cli(env, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {variable}:"), lines[0]


def test_in_process_bus_refuses_split_roles(tmp_path):
    done = cli(base_env(UPI_DATA_DIR=str(tmp_path / "d")), "serve", "--role", "relay")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: UPI_BUS:")
