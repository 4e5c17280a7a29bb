import os
import subprocess
import sys

import pytest

from core.config import AUTO_GATEWAY_PROCESSES, BusKind, auto_gateway_processes, load_settings
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


def test_gateway_processes_default_to_auto_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("UPI_GATEWAY_PROCESSES", raising=False)
    s = load_settings()
    assert s.gateway_processes == "auto"
    assert s.gateway_process_count == min(AUTO_GATEWAY_PROCESSES, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("UPI_GATEWAY_PROCESSES", "Auto")
    assert load_settings().gateway_process_count == auto_gateway_processes()
    monkeypatch.setenv("UPI_GATEWAY_PROCESSES", "3")
    assert load_settings().gateway_process_count == 3


def test_auto_follows_the_affinity_mask():
    """In a process allowed on one CPU only (as under ``taskset -c 0`` or a one-CPU
    cpuset), auto is one process, whatever the machine has."""
    cpu = min(os.sched_getaffinity(0))
    script = (
        "import os; os.environ['UPI_GATEWAY_PROCESSES'] = 'auto';"
        "from core.config import load_settings; print(load_settings().gateway_process_count)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize("value", ["0", "65", "many", "-1", "1.5", ""])
def test_gateway_processes_is_auto_or_a_count(monkeypatch, value):
    monkeypatch.setenv("UPI_GATEWAY_PROCESSES", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("UPI_GATEWAY_PROCESSES: must be auto or a number")


@pytest.mark.parametrize(
    ("var", "value", "secret"),
    [
        ("UPI_DATABASE_URL", "mysql://upi:s3cret-pw@db.internal/upi", "s3cret-pw"),
        ("UPI_NPCI_URL", "ftp://switch:hunter22@npci.example/", "hunter22"),
    ],
)
def test_a_config_error_never_echoes_a_password(monkeypatch, var, value, secret):
    """Issue 20, part 6: the line names the variable and the problem, not the secret."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert var in str(caught.value) and secret not in str(caught.value)
    assert "***" in str(caught.value)


def test_a_master_key_file_others_may_read_refuses_to_start(monkeypatch, tmp_path):
    """Issue 20, part 6: as ssh refuses a private key others can read."""
    import base64

    from core.crypto import load_master_key

    key_file = tmp_path / "master.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("UPI_MASTER_KEY_FILE", str(key_file))
    for loose in (0o644, 0o640, 0o602):
        key_file.chmod(loose)
        with pytest.raises(ConfigError) as caught:
            load_master_key(load_settings())
        assert f"mode {loose:04o}" in str(caught.value) and "chmod 600" in str(caught.value)
    key_file.chmod(0o600)
    assert load_master_key(load_settings()) is not None
    # The embedded default's own key file is held to the same rule.
    monkeypatch.delenv("UPI_MASTER_KEY_FILE")
    monkeypatch.setenv("UPI_DATA_DIR", str(tmp_path / "data"))
    load_master_key(load_settings())  # made at 0600
    (tmp_path / "data" / "master.key").chmod(0o666)
    with pytest.raises(ConfigError):
        load_master_key(load_settings())


def test_settlement_cycles_default_to_npcis_table(monkeypatch):
    from api.bootstrap import settlement_cycles
    from settlement.cycles import NPCI_CYCLES

    monkeypatch.delenv("UPI_SETTLEMENT_CYCLES", raising=False)
    assert settlement_cycles(load_settings()) is NPCI_CYCLES


def test_settlement_cycles_are_read_from_json(monkeypatch):
    from api.bootstrap import settlement_cycles

    monkeypatch.setenv(
        "UPI_SETTLEMENT_CYCLES",
        '[{"name": "AM", "cutoff": "12:00"}, {"name": "PM", "cutoff": "24:00"},'
        ' {"name": "DC", "cutoff": "24:00", "dispute": true}]',
    )
    table = settlement_cycles(load_settings())
    assert table.names == ("AM", "PM", "DC")
    assert [c.dispute for c in table.cycles] == [False, False, True]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            '[{"name": "B", "cutoff": "13:00"}, {"name": "A", "cutoff": "12:00"},'
            ' {"name": "D", "cutoff": "24:00", "dispute": true}]',
            "settlement cycle 'A' (12:00) must end after 'B' (13:00)",
        ),
        (
            '[{"name": "A", "cutoff": "12:00"}, {"name": "A", "cutoff": "13:00"},'
            ' {"name": "D", "cutoff": "24:00", "dispute": true}]',
            "cycle name 'A' is listed twice",
        ),
        (
            '[{"name": "A", "cutoff": "12h"}, {"name": "D", "cutoff": "24:00", "dispute": true}]',
            "cycle 'A': cut-off '12h' is not HH:MM",
        ),
        ("not json", "UPI_SETTLEMENT_CYCLES"),
    ],
)
def test_a_bad_cycle_table_stops_the_start_with_one_line_naming_it(monkeypatch, value, problem):
    from api.bootstrap import Engine

    monkeypatch.setenv("UPI_SETTLEMENT_CYCLES", value)
    with pytest.raises(ConfigError) as info:
        Engine.build(load_settings())
    message = str(info.value)
    assert message.startswith("UPI_SETTLEMENT_CYCLES:") and problem in message
    assert "\n" not in message
