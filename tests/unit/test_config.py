import pytest

from core.config import BusKind, load_settings
from core.errors import ConfigError


def test_defaults_are_the_embedded_default(monkeypatch):
    for var in ("UPI_DATABASE_URL", "UPI_BUS"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.embedded and s.bus is BusKind.MEMORY and s.kafka_idempotence


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("UPI_BUS", "rabbit"),
        ("UPI_DATABASE_URL", "mysql://x"),
        ("UPI_KAFKA_PARTITIONS", "0"),
        ("UPI_KAFKA_IDEMPOTENCE", "perhaps"),
        ("UPI_RELAY_POLL_INTERVAL_S", "-1"),
        ("UPI_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"{var}:") and "\n" not in message
