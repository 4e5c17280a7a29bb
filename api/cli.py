"""The ``upi-engine`` command line (SPEC §3). Exit codes: 0 ok, 1 a check failed, 2 bad
usage or configuration."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from api.auth import Role as PrincipalRole
from api.auth import issue_token
from api.bootstrap import Engine, Role
from core.config import Settings, load_settings
from core.embedded import embedded_url_if_running
from core.errors import ConfigError, NotFound, VpaTaken
from core.ids import new_merchant_id
from core.logging import configure_logging
from core.pii import VPA_PATTERN
from core.storage import Database, migrate, plain_url

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="UPI payment event engine")
merchant_app = typer.Typer(no_args_is_help=True, help="Merchants")
db_app = typer.Typer(no_args_is_help=True, help="Database")
auditor_app = typer.Typer(no_args_is_help=True, help="Auditors (read the compliance ledger)")
operator_app = typer.Typer(no_args_is_help=True, help="Operators (settlement, DR, webhooks)")
webhooks_app = typer.Typer(no_args_is_help=True, help="Merchant webhooks")
ledger_app = typer.Typer(no_args_is_help=True, help="The compliance ledger")
keys_app = typer.Typer(no_args_is_help=True, help="Ledger data keys")
settlement_app = typer.Typer(no_args_is_help=True, help="T+1 settlement")
fraud_app = typer.Typer(no_args_is_help=True, help="The fraud model")
dr_app = typer.Typer(no_args_is_help=True, help="Disaster recovery: status and drills")
app.add_typer(merchant_app, name="merchant")
app.add_typer(auditor_app, name="auditor")
app.add_typer(operator_app, name="operator")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(ledger_app, name="ledger")
app.add_typer(keys_app, name="keys")
app.add_typer(settlement_app, name="settlement")
app.add_typer(fraud_app, name="fraud")
app.add_typer(dr_app, name="dr")
app.add_typer(db_app, name="db")

out = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def _fail_config(exc: ConfigError) -> NoReturn:
    sys.stderr.write(f"error: {exc}\n")  # one line, never wrapped
    raise typer.Exit(2)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail_config(exc)
    configure_logging(settings.log_level)
    return settings


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    role: Annotated[list[Role] | None, typer.Option(help="Roles to run (repeatable)")] = None,
    beside: Annotated[
        bool, typer.Option(hidden=True, help="An extra gateway process of a serve (internal)")
    ] = False,
) -> None:
    """Run the API and/or workers."""
    import uvicorn

    from api.http import create_app
    from core.config import BusKind

    settings = _settings()
    roles = role or [Role.ALL]
    try:
        engine = Engine.build(settings, roles, beside_workers=beside)
    except ConfigError as exc:
        _fail_config(exc)
    config = uvicorn.Config(
        create_app(engine),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    extra = 0
    if settings.bus is BusKind.MEMORY and Role.ALL in roles and port != 0:
        extra = settings.gateway_processes - 1
    if not extra and not beside:
        server.run()
        return
    from api.processes import listening_socket, start_gateways, stop_gateways

    sock = listening_socket(host, port)
    gateways = start_gateways(extra, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        stop_gateways(gateways)


async def _create_merchant(
    engine: Engine, name: str, vpa: str, mcc: str, webhook_url: str | None
) -> dict[str, str]:
    from payments.merchants import Merchant, insert_merchant

    merchant_id = new_merchant_id()
    webhook_secret = "whsec_" + base64.urlsafe_b64encode(os.urandom(32)).decode()
    sealed = engine.master_key.seal(webhook_secret.encode(), merchant_id.encode())
    merchant = Merchant(merchant_id, name, vpa.lower(), mcc, webhook_url)
    async with engine.db.transaction() as conn:
        api_key = await issue_token(
            conn,
            principal_id=merchant_id,
            role=PrincipalRole.MERCHANT,
            name=name,
            merchant_id=merchant_id,
        )
        await insert_merchant(conn, merchant, sealed)
    return {"merchant_id": merchant_id, "api_key": api_key, "webhook_secret": webhook_secret}


@app.command("npci-mock")
def npci_mock(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8090,
) -> None:
    """Run the mock NPCI switch as its own HTTP process (point UPI_NPCI_URL at it)."""
    import uvicorn

    from api.bootstrap import all_migrations, database_url, mock_switch
    from core.storage import Database
    from payments.npci.http import create_mock_app

    settings = _settings()
    try:
        db = Database(database_url(settings), pool_size=settings.db_pool_size)
    except ConfigError as exc:
        _fail_config(exc)

    async def start() -> None:
        await migrate(db, all_migrations())

    app_ = create_mock_app(mock_switch(settings, db), on_start=start, on_stop=db.close)
    uvicorn.run(app_, host=host, port=port, log_config=None, access_log=False)


@merchant_app.command("create")
def merchant_create(
    name: Annotated[str, typer.Option(help="Merchant's display name")],
    vpa: Annotated[str, typer.Option(help="Merchant's collecting VPA")],
    mcc: Annotated[str, typer.Option(help="Merchant category code")] = "5411",
    webhook_url: Annotated[str | None, typer.Option(help="Final-status webhook URL")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create a merchant; prints its API key and webhook secret (shown once)."""
    if not VPA_PATTERN.match(vpa):
        _fail_config(ConfigError("--vpa: not a valid VPA (local-part@handle)"))
    if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
        _fail_config(ConfigError("--webhook-url: must be an http(s):// URL"))
    if not (mcc.isdigit() and len(mcc) == 4):
        _fail_config(ConfigError("--mcc: must be 4 digits"))
    settings = _settings()
    try:
        created = asyncio.run(
            _with_engine(settings, lambda e: _create_merchant(e, name, vpa, mcc, webhook_url))
        )
    except ConfigError as exc:
        _fail_config(exc)
    except VpaTaken as exc:
        _fail_config(ConfigError(f"--vpa: {exc}"))
    if json:
        sys.stdout.write(orjson.dumps(created).decode() + "\n")
        return
    out.print(f"merchant_id     {created['merchant_id']}")
    out.print(f"api_key         {created['api_key']}")
    out.print(f"webhook_secret  {created['webhook_secret']}")
    out.print("[yellow]The API key and webhook secret are shown once. Store them now.[/]")


@merchant_app.command("add-vpa")
def merchant_add_vpa(
    merchant: Annotated[str, typer.Option(help="Merchant id (mer_…)")],
    vpa: Annotated[str, typer.Option(help="Another VPA the merchant collects into")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Register another VPA the merchant collects into (its payments may name it as payee).

    One VPA belongs to one merchant; adding one already registered to this merchant
    changes nothing.
    """
    from core.pii import Vpa
    from payments.merchants import register_vpa

    if not VPA_PATTERN.match(vpa):
        _fail_config(ConfigError("--vpa: not a valid VPA (local-part@handle)"))
    settings = _settings()

    async def add(engine: Engine) -> bool:
        async with engine.db.transaction() as conn:
            return await register_vpa(conn, merchant, Vpa(vpa))

    try:
        added = asyncio.run(_with_engine(settings, add))
    except ConfigError as exc:
        _fail_config(exc)
    except NotFound:
        _fail_config(ConfigError(f"--merchant: no merchant {merchant}"))
    except VpaTaken as exc:
        _fail_config(ConfigError(f"--vpa: {exc}"))
    if json:
        result = {"merchant_id": merchant, "vpa": vpa.lower(), "registered": added}
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    elif added:
        out.print(f"registered {Vpa(vpa)} for {merchant}")
    else:
        out.print(f"{Vpa(vpa)} was already registered for {merchant}")


async def _with_engine(settings: Settings, work: Callable[[Engine], Awaitable[T]]) -> T:
    """Run ``work`` against the database (migrated), then release it."""
    from api.bootstrap import all_migrations

    try:
        engine = Engine.build(settings, [Role.ALL])
    except ConfigError as exc:
        _fail_config(exc)
    try:
        await migrate(engine.db, all_migrations())
        return await work(engine)
    finally:
        await engine.db.close()


async def _with_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``work`` against the database (migrated) without the master key: for what reads
    only signed or sealed data, so that auditors' tooling never needs the key."""
    from api.bootstrap import all_migrations, database_url

    db = Database(database_url(settings), pool_size=settings.db_pool_size)
    try:
        await migrate(db, all_migrations())
        return await work(db)
    finally:
        await db.close()


def _measures(title: str, rows: Iterable[tuple[str, object]]) -> None:
    """A two-column table of measures on stdout."""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)


def _flat(result: dict[str, Any]) -> Iterator[tuple[str, object]]:
    """A result's fields, those of a nested object as ``outer: inner``."""
    for key, value in result.items():
        if isinstance(value, dict):
            yield from ((f"{key}: {inner}", v) for inner, v in value.items())
        else:
            yield key, value


def _progress(
    message: str, quiet: bool, *columns: ProgressColumn, total: float | None = None
) -> Progress:
    """Progress with ``message`` on stderr, on a terminal unless ``quiet`` (``--json``); its
    one task is ``progress.tasks[0]``."""
    progress = Progress(
        *columns,
        console=err_console,
        transient=True,
        disable=quiet or not err_console.is_terminal,
    )
    progress.add_task(message, total=total)
    return progress


def _spinner(message: str, quiet: bool, *, elapsed: bool = False) -> Progress:
    """A spinner: for work of unknown length."""
    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
    if elapsed:
        columns.append(TimeElapsedColumn())
    return _progress(message, quiet, *columns)


def _bar(message: str, total: float | None, quiet: bool) -> Progress:
    """A bar counting up to ``total``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return _progress(message, quiet, *columns, TimeElapsedColumn(), total=total)


def _print_token(role: PrincipalRole, name: str, json: bool) -> None:
    settings = _settings()

    async def create(engine: Engine) -> dict[str, str]:
        principal_id = f"{role.value[:3]}_{new_merchant_id()[4:]}"
        async with engine.db.transaction() as conn:
            token = await issue_token(conn, principal_id=principal_id, role=role, name=name)
        return {"principal_id": principal_id, "name": name, "role": role.value, "token": token}

    try:
        created = asyncio.run(_with_engine(settings, create))
    except ConfigError as exc:
        _fail_config(exc)
    if json:
        sys.stdout.write(orjson.dumps(created).decode() + "\n")
        return
    out.print(f"{role.value}_id  {created['principal_id']}")
    out.print(f"token        {created['token']}")
    out.print("[yellow]The token is shown once. Store it now.[/]")


@auditor_app.command("create")
def auditor_create(
    name: Annotated[str, typer.Option(help="Auditor's name")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create an auditor; prints its bearer token (shown once)."""
    _print_token(PrincipalRole.AUDITOR, name, json)


@operator_app.command("create")
def operator_create(
    name: Annotated[str, typer.Option(help="Operator's name")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create an operator; prints its bearer token (shown once)."""
    _print_token(PrincipalRole.OPERATOR, name, json)


@webhooks_app.command("list")
def webhooks_list(
    status: Annotated[str, typer.Option(help="PENDING, DELIVERED or DEAD")] = "DEAD",
    merchant: Annotated[str | None, typer.Option(help="Only this merchant")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """List webhook deliveries (by default the dead-lettered ones)."""
    from core.storage import sql_text

    status = status.upper()
    if status not in {"PENDING", "DELIVERED", "DEAD"}:
        _fail_config(ConfigError("--status: one of PENDING, DELIVERED, DEAD"))
    settings = _settings()

    async def fetch(engine: Engine) -> list[dict[str, object]]:
        sql = (
            "SELECT id, merchant_id, transaction_id, attempts, last_error, created_at"
            " FROM webhook_deliveries WHERE status = :s"
        )
        params: dict[str, object] = {"s": status}
        if merchant:
            sql += " AND merchant_id = :m"
            params["m"] = merchant
        async with engine.db.connection() as conn:
            rows = (await conn.execute(sql_text(sql + " ORDER BY id LIMIT 1000"), params)).all()
        return [{**r._asdict(), "created_at": r.created_at.isoformat()} for r in rows]

    rows = asyncio.run(_with_engine(settings, fetch))
    if json:
        sys.stdout.write(orjson.dumps({"status": status, "deliveries": rows}).decode() + "\n")
        return

    table = Table("id", "merchant", "transaction", "attempts", "last error")
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["merchant_id"]),
            str(r["transaction_id"]),
            str(r["attempts"]),
            str(r["last_error"] or ""),
        )
    out.print(table)


@webhooks_app.command("replay")
def webhooks_replay(
    merchant: Annotated[str | None, typer.Option(help="Only this merchant's")] = None,
    delivery_id: Annotated[int | None, typer.Option("--id", help="Only this delivery")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Put dead-lettered webhook deliveries back on the retry schedule."""
    from core.clock import SystemClock
    from payments.webhooks import replay_dead_webhooks

    settings = _settings()

    async def replay(engine: Engine) -> int:
        return await replay_dead_webhooks(
            engine.db, SystemClock(), merchant_id=merchant, delivery_id=delivery_id
        )

    count = asyncio.run(_with_engine(settings, replay))
    if json:
        sys.stdout.write(orjson.dumps({"replayed": count}).decode() + "\n")
    else:
        out.print(f"replayed {count} dead webhook deliveries")


@ledger_app.command("verify")
def ledger_verify(
    full: Annotated[bool, typer.Option("--full", help="Recheck from height 0")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Recompute the chain, Merkle roots and checkpoint signatures. Exit 0 valid, 1 invalid.

    Resumes after the last checkpoint a previous run verified, unless --full.
    """
    from compliance.ledger import verify_ledger
    from core.clock import SystemClock

    settings = _settings()
    with _spinner("verifying the ledger…", json):
        result = asyncio.run(
            _with_database(settings, lambda db: verify_ledger(db, SystemClock(), full=full))
        )
    if json:
        sys.stdout.write(orjson.dumps(result.to_dict()).decode() + "\n")
    elif result.valid:
        out.print(
            f"[green]valid[/]: {result.entries} entries, {result.checkpoints} checkpoints"
            f"{' (resumed)' if not full else ''}"
        )
    else:
        out.print(f"[red]INVALID[/] at height {result.first_bad_height}: {result.reason}")
    raise typer.Exit(0 if result.valid else 1)


@ledger_app.command("export")
def ledger_export(
    out_file: Annotated[Path, typer.Option("--out", help="JSON Lines file to write")],
    from_height: Annotated[int, typer.Option(min=0, help="First entry height")] = 0,
) -> None:
    """Write the ledger in the export format (SPEC §6)."""
    from compliance.ledger import export_lines

    settings = _settings()

    async def export(db: Database) -> int:
        count = 0
        with out_file.open("wb") as f:
            async for line in export_lines(db, from_height):
                f.write(orjson.dumps(line) + b"\n")
                count += 1
        return count

    count = asyncio.run(_with_database(settings, export))
    out.print(f"wrote {count} lines to {out_file}")


@ledger_app.command("public-key")
def ledger_public_key() -> None:
    """Print the checkpoint verification key (PEM)."""
    from compliance.keys import active_signing_key
    from core.clock import SystemClock

    settings = _settings()

    async def pem(engine: Engine) -> str:
        async with engine.db.transaction() as conn:
            key = await active_signing_key(conn, engine.master_key, SystemClock().now())
        return key.public_pem

    sys.stdout.write(asyncio.run(_with_engine(settings, pem)))


@keys_app.command("rotate")
def keys_rotate(
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Make a new data-encryption key active; old keys keep decrypting."""
    from compliance.keys import rotate_data_key
    from core.clock import SystemClock

    settings = _settings()

    async def rotate(engine: Engine) -> str:
        async with engine.db.transaction() as conn:
            key = await rotate_data_key(conn, engine.master_key, SystemClock().now())
        return key.key_id

    key_id = asyncio.run(_with_engine(settings, rotate))
    if json:
        sys.stdout.write(orjson.dumps({"key_id": key_id}).decode() + "\n")
    else:
        out.print(f"new active data key {key_id}")


@keys_app.command("shred")
def keys_shred(
    retention_days: Annotated[
        int, typer.Option(min=0, help="Destroy inactive keys older than this (7 years)")
    ] = 7 * 365 + 2,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Crypto-shred data keys past retention: their payloads become unreadable for good,
    and the chain still verifies."""
    from datetime import timedelta

    from compliance.keys import shred_data_keys
    from core.clock import SystemClock

    settings = _settings()

    async def shred(engine: Engine) -> list[str]:
        async with engine.db.transaction() as conn:
            return await shred_data_keys(conn, SystemClock().now(), timedelta(days=retention_days))

    destroyed = asyncio.run(_with_engine(settings, shred))
    if json:
        sys.stdout.write(orjson.dumps({"destroyed": destroyed}).decode() + "\n")
    else:
        out.print(f"destroyed {len(destroyed)} data keys: {', '.join(destroyed) or '-'}")


@fraud_app.command("train")
def fraud_train(
    seed: Annotated[int | None, typer.Option(help="Simulator and model seed")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Directory (default: DATA_DIR/fraud-model)")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Train the model on simulated traffic, measure it on held-out traffic, save it.

    The shipped model is `fraud train --seed 20261125`; the same seed gives the same model
    (same version). Use it with UPI_FRAUD_MODEL_DIR=<out>.
    """
    from fraud.model import DEFAULT_SEED, main_train

    settings = _settings()
    target = out_dir or settings.data_dir / "fraud-model"
    with _spinner("simulating traffic and training…", json):
        result = main_train(DEFAULT_SEED if seed is None else seed, target)
    if json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    held = result["held_out"]
    out.print(f"model {result['version']} written to {target}")
    out.print(f"held-out ROC-AUC {held['roc_auc']}  PR-AUC {held['pr_auc']}")
    out.print(f"use it with UPI_FRAUD_MODEL_DIR={target}")


@fraud_app.command("evaluate")
def fraud_evaluate(
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Held-out metrics of the model in use (UPI_FRAUD_MODEL_DIR or the shipped one): ROC-AUC,
    PR-AUC, precision and recall at the decision thresholds, alone and with the rules."""
    from fraud.model import evaluate as evaluate_model
    from fraud.model import load_model

    settings = _settings()
    model = load_model(settings.fraud_model_dir)
    with _spinner("simulating held-out traffic and scoring it…", json):
        result = evaluate_model(
            model,
            int(model.meta["seed"]),
            step_up=settings.fraud_step_up_threshold,
            block=settings.fraud_block_threshold,
        )
    if json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    table = Table(title=f"fraud model {result['model_version']} on held-out traffic")
    table.add_column("measure")
    table.add_column("model", justify="right")
    table.add_column("model + rules", justify="right")
    combined = result["combined"]
    table.add_row("ROC-AUC", str(result["roc_auc"]), str(combined["roc_auc"]))
    table.add_row("PR-AUC", str(result["pr_auc"]), str(combined["pr_auc"]))
    for name in ("step_up", "block"):
        alone, both = result["model_at_thresholds"][name], combined[name]
        label = f"{name} ≥ {alone['threshold']}"
        table.add_row(f"{label} precision", str(alone["precision"]), str(both["precision"]))
        table.add_row(f"{label} recall", str(alone["recall"]), str(both["recall"]))
    out.print(table)
    shares = ", ".join(f"{k} {v:.1%}" for k, v in result["flagged_by_typology"].items())
    out.print(f"stepped up or blocked, by typology: {shares}")


@dr_app.command("status")
def dr_status_command(
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """This database's role, its standbys (sync state, lag), the last failover, and the
    orchestrator's routing table (UPI_DR_STATE_FILE)."""
    from dr.status import dr_status

    settings = _settings()

    async def read(engine: Engine) -> dict[str, Any]:
        async with engine.db.connection() as conn:
            return await dr_status(conn, settings.dr_state_file)

    status = asyncio.run(_with_engine(settings, read))
    if json:
        sys.stdout.write(orjson.dumps(status).decode() + "\n")
        return
    out.print(f"database: {status['database_role']}")
    out.print(f"synchronous standbys: {status['synchronous_standby_names'] or 'none'}")
    for standby in status["standbys"]:
        out.print(
            f"  {standby['name']}: {standby['state']} ({standby['sync_state']}),"
            f" replay lag {standby['replay_lag_seconds']}"
        )
    last = status["last_failover"]
    if last:
        moved = f"{last['old_primary']} → {last['new_primary']}"
        out.print(f"last failover: {moved} at {last['completed_at']}")
    if status["orchestrator"]:
        orch = status["orchestrator"]
        out.print(f"orchestrator: primary {orch['primary']}, proxy {orch['proxy']}")


@dr_app.command("drill")
def dr_drill(
    scenario: Annotated[str, typer.Option(help="primary-loss | standby-loss | failback")],
    rate: Annotated[float, typer.Option(min=0.1, help="Payments per second throughout")] = 20.0,
    duration: Annotated[float, typer.Option(min=5, help="Seconds of traffic")] = 40.0,
    kill_after: Annotated[float, typer.Option(min=1, help="Seconds before the SIGKILL")] = 10.0,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the regions' data dirs (stopped) for inspection")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Build three regions on this machine (PostgreSQL with streaming replication, quorum
    commit), drive payments through one URL, SIGKILL a region's PostgreSQL, let the
    orchestrator act, and report RTO, RPO, lost payments, duplicate debits and the ledger.
    Exit 0 only when every invariant holds."""
    from dr.drill import SCENARIOS, DrillConfig, run_drill

    if scenario not in SCENARIOS:
        err_console.print(f"--scenario must be one of {', '.join(SCENARIOS)}")
        raise typer.Exit(2)
    settings = _settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if kill_after >= duration:
        err_console.print("--kill-after must be shorter than --duration")
        raise typer.Exit(2)
    config = DrillConfig(
        scenario=scenario,
        rate=rate,
        duration_s=duration,
        kill_after_s=kill_after,
        keep=keep,
        pg_bin=settings.dr_pg_bin,
    )
    with _spinner(f"{scenario} drill", json, elapsed=True) as progress:
        task = progress.tasks[0].id

        def report(step: str) -> None:
            progress.update(task, description=f"{scenario}: {step}")
            if not err_console.is_terminal and not json:
                err_console.print(step)

        result = asyncio.run(run_drill(config, report))
    if json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        keys = (
            "old_primary",
            "new_primary",
            "accepted_payments",
            "final_payments",
            "lost_payments",
            "duplicate_debits",
            "rto_seconds",
            "rpo_seconds",
            "ledger_valid",
        )
        phases = [(f"  phase {p['name']}", f"{p['seconds']} s") for p in result["phases"]]
        _measures(f"DR drill: {scenario}", [*((k, result[k]) for k in keys), *phases])
        out.print("[green]every invariant holds[/]" if result["ok"] else "[red]a check failed[/]")
    raise typer.Exit(0 if result["ok"] else 1)


@settlement_app.command("run")
def settlement_run(
    business_date: Annotated[str, typer.Option(help="IST business date to close, YYYY-MM-DD")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for DATE/ files")] = Path(
        "settlements"
    ),
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Close a business date: inter-bank nets, merchant payouts, reconciliation (SPEC §7).

    Running it again gives identical files; a date must be over (IST) to be closed.
    """
    from datetime import date as date_

    from api.bootstrap import holiday_calendar
    from core.clock import SystemClock
    from core.clock import business_date as ist_date
    from settlement.journal import ComplianceLedgerIndex, NpciJournal
    from settlement.run import settle_business_date, write_files

    try:
        day = date_.fromisoformat(business_date)
    except ValueError:
        _fail_config(ConfigError("--business-date: not a YYYY-MM-DD date"))
    clock = SystemClock()
    if day >= ist_date(clock.now()):
        _fail_config(ConfigError(f"--business-date: {day} is not over yet in IST"))
    settings = _settings()
    try:
        calendar = holiday_calendar(settings)
    except ConfigError as exc:
        _fail_config(exc)

    async def run(engine: Engine) -> Any:
        return await settle_business_date(
            engine.db,
            NpciJournal(engine.db),
            day,
            ledger=ComplianceLedgerIndex(engine.db),
            calendar=calendar,
            mdr_bps=settings.settlement_mdr_bps,
            clock=clock,
        )

    result = asyncio.run(_with_engine(settings, run))
    target = write_files(result, out_dir)
    if json:
        sys.stdout.write(
            orjson.dumps(
                {**result.summary, "out_dir": str(target), "closed_now": result.closed_now}
            ).decode()
            + "\n"
        )
        return
    s = result.summary
    out.print(
        f"{'closed' if result.closed_now else 'already closed'} {day};"
        f" settles on {s['settlement_date']}; files in {target}"
    )
    out.print(
        f"payments {s['payments']}  gross {s['gross_paise']}  refunds {s['refunds_paise']}"
        f"  net payout {s['net_payout_paise']} (paise)"
    )
    out.print(f"reconciliation {s['reconciliation']}")


@app.command("load")
def load(
    url: Annotated[str, typer.Option(help="The engine's base URL, e.g. http://127.0.0.1:8000")],
    api_key: Annotated[str, typer.Option(help="A merchant's API key")],
    rate: Annotated[float, typer.Option(min=0.1, help="New payments per second")] = 10.0,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds of traffic")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulated customers")] = 20261125,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Send realistic payments (the fraud simulator's ordinary customers: their VPAs,
    amounts, phones and places) to a running engine at a steady rate, as a well-behaved
    merchant: own idempotency keys, 429s waited out, 5xx retried. Exit 1 if a payment was
    refused or never answered."""
    import uuid

    from api.loadgen import drive_at_rate, traffic

    logging.getLogger("httpx").setLevel(logging.WARNING)
    bodies = traffic(seed, f"load-{uuid.uuid4().hex[:8]}")
    with _bar("payments", round(rate * duration), json) as progress:
        task = progress.tasks[0].id
        sent = asyncio.run(
            drive_at_rate(
                url.rstrip("/"),
                api_key,
                bodies,
                rate,
                duration,
                on_sent=lambda: progress.advance(task),
            )
        )
    summary = sent.summary()
    if json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        _measures(f"load: {rate:g}/s for {duration:g} s against {url}", _flat(summary))
    raise typer.Exit(0 if summary["accepted"] == summary["sent"] else 1)


@app.command("bench")
def bench(
    payments: Annotated[
        int | None, typer.Option(min=1, help="Payments to send: the closed loop [default: 2000]")
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            max=512,
            help="Requests in flight (open loop: connections at the start, more when all are busy)",
        ),
    ] = 32,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Open loop: payments offered per second")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Open loop: seconds of offered payments")
    ] = None,
    bus: Annotated[str, typer.Option(help="memory | kafka (at UPI_KAFKA_BOOTSTRAP)")] = "memory",
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=8,
            help="memory: HTTP processes of one serve (UPI_GATEWAY_PROCESSES);"
            " kafka: 1 every role in one, 2 gateway | workers",
        ),
    ] = 1,
    switch_latency_scale: Annotated[
        float,
        typer.Option(min=0, max=10, help="The mock switch's bank latencies x this (0: none)"),
    ] = 1.0,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Run the whole engine on a scratch embedded PostgreSQL, send realistic payments, wait
    for their final statuses and the ledger, and compare with baselines measured in the same
    run by the same client: a bare FastAPI endpoint and a bare PostgreSQL insert loop; with
    the CPU time, statements and transactions per payment and the client's CPU share
    (SPEC §9). The closed loop (--payments, --concurrency) is driven by wrk; the open loop
    (--rate, --duration) by a light client that measures latencies from each request's
    intended send time."""
    from api.bench import BenchError, WrkMissing, find_wrk, run_bench
    from api.bench_client import scheduled_count

    if bus not in ("memory", "kafka"):
        err_console.print("--bus must be memory or kafka")
        raise typer.Exit(2)
    if processes > 2 and bus == "kafka":
        err_console.print("--bus kafka runs 1 process (every role) or 2 (gateway | workers)")
        raise typer.Exit(2)
    if (rate is None) != (duration is None):
        err_console.print("the open loop needs both --rate and --duration")
        raise typer.Exit(2)
    if rate is not None and payments is not None:
        err_console.print("--payments is the closed loop, --rate/--duration the open one: not both")
        raise typer.Exit(2)
    if rate is None:
        try:
            find_wrk()
        except WrkMissing as exc:
            err_console.print(f"bench: {exc}", soft_wrap=True)  # one line
            raise typer.Exit(2) from None
    logging.getLogger("httpx").setLevel(logging.WARNING)
    count = payments or 2_000
    if rate is not None and duration is not None:
        count = scheduled_count(rate, duration)
    with _bar("starting", count, json) as progress:
        task = progress.tasks[0].id
        try:
            result = asyncio.run(
                run_bench(
                    count,
                    concurrency,
                    bus,
                    processes=processes,
                    rate=rate,
                    duration_s=duration,
                    switch_latency_scale=switch_latency_scale,
                    on_phase=lambda phase: progress.update(task, description=phase),
                    on_progress=lambda n: progress.update(task, completed=n),
                )
            )
        except BenchError as exc:
            err_console.print(f"bench: {exc}")
            usage = isinstance(exc, WrkMissing) or "UPI_KAFKA_BOOTSTRAP" in str(exc)
            raise typer.Exit(2 if usage else 1) from None
    if json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    top = result.pop("top_statements")
    if rate is None:
        title = f"bench: {count} payments, {concurrency} in flight"
    else:
        title = f"bench: {rate:g}/s for {duration:g} s (open loop)"
    title += f", bus {bus}, {processes} process" + ("es" if processes > 1 else "")
    _measures(title, _flat(result))
    statements = Table(title="the engine's most frequent statements")
    for column in ("per payment", "mean ms", "statement"):
        statements.add_column(column, justify="left" if column == "statement" else "right")
    for row in top:
        statements.add_row(str(row["per_payment"]), str(row["mean_ms"]), row["query"])
    out.print(statements)


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use.

    Embedded: the running server's socket URL. If no process runs the server, it is not
    started (it would stop again when this command exits): say so and exit 1.
    """
    settings = _settings()
    if settings.database_url:
        sys.stdout.write(plain_url(settings.database_url) + "\n")
        return
    url = embedded_url_if_running(settings.data_dir)
    if url is None:
        sys.stderr.write(
            f"error: the embedded PostgreSQL in {settings.data_dir} is not running;"
            " start `upi-engine serve` first\n"
        )
        raise typer.Exit(1)
    sys.stdout.write(plain_url(url) + "\n")


def main() -> None:
    app()
