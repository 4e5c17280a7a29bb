"""The ``upi-engine`` command line (SPEC §3). Exit codes: 0 ok, 1 a check failed, 2 bad
usage or configuration."""

from __future__ import annotations

# First: `serve` chooses where prometheus_client keeps metric values before it is imported.
import api.serve_metrics  # noqa: F401

# isort: split
import asyncio
import base64
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

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

from api.bootstrap import Role
from api.shutdown import exit_on_sigterm, graceful_server
from core.errors import ConfigError, NotFound, VpaTaken
from core.ids import new_merchant_id

# Every command imports what it uses, in its body: `--help`, or a command that only reaches
# the database, loads neither the engine's contexts nor the HTTP app. The names here are
# light (api.bootstrap imports in its functions too); what only types need is below.
if TYPE_CHECKING:
    from api.auth import Role as PrincipalRole
    from api.bootstrap import Engine
    from core.config import Settings
    from core.storage import Database

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
token_app = typer.Typer(no_args_is_help=True, help="Credentials: API keys and bearer tokens")
app.add_typer(merchant_app, name="merchant")
app.add_typer(token_app, name="token")
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
    from core.config import load_settings
    from core.logging import configure_logging

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
    import socket

    import uvicorn

    from api.bootstrap import Engine
    from api.http import create_app
    from core.config import BusKind

    settings = _settings()
    roles = role or [Role.ALL]
    extra = 0
    if settings.bus is BusKind.MEMORY and Role.ALL in roles and port != 0:
        extra = settings.gateway_process_count - 1
    internal_port = None if beside else settings.internal_port  # the main process's only
    if settings.production and internal_port is None and not beside:
        _fail_config(
            ConfigError(
                "UPI_INTERNAL_PORT: required with UPI_ENV=production"
                " (the listener of /docs, /openapi.json and /metrics)"
            )
        )
    from api.internal import create_internal_app, internal_socket, run_with_internal

    internal_sock: socket.socket | None = None
    if internal_port is not None:
        if internal_port == port:
            _fail_config(ConfigError(f"UPI_INTERNAL_PORT: must differ from --port ({port})"))
        try:
            internal_sock = internal_socket(settings.internal_host, internal_port)
        except OSError as exc:
            _fail_config(
                ConfigError(
                    f"UPI_INTERNAL_PORT: cannot listen on"
                    f" {settings.internal_host}:{internal_port} ({exc.strerror or exc})"
                )
            )
    try:
        engine = Engine.build(settings, roles, beside_workers=beside, gateways_beside=extra > 0)
    except ConfigError as exc:
        _fail_config(exc)
    public_app = create_app(engine)
    config = uvicorn.Config(
        public_app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = graceful_server(config, force_exit=lambda: _exit_at_once(settings))
    sockets: list[socket.socket] | None = None

    def run() -> None:
        if internal_sock is None:
            server.run(sockets=sockets)
        else:
            run_with_internal(server, sockets, create_internal_app(public_app), internal_sock)

    if not extra and not beside:
        run()
        return
    from api.processes import listening_socket, start_gateways, stop_gateways

    sockets = [listening_socket(host, port)]
    gateways = start_gateways(extra, host, port)
    try:
        run()
    finally:
        stop_gateways(gateways)


async def _create_merchant(
    engine: Engine, name: str, vpa: str, mcc: str, webhook_url: str | None
) -> dict[str, str]:
    from api.auth import Role as PrincipalRole
    from api.auth import issue_token
    from payments.merchants import Merchant, insert_merchant

    merchant_id = new_merchant_id()
    webhook_secret = _new_webhook_secret()
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

    from api.bootstrap import database_url, mock_switch, simulator_migrations
    from core.storage import Database, migrate
    from npcisim.http import create_mock_app

    settings = _settings()
    try:
        db = Database(database_url(settings), pool_size=settings.db_pool_size)
    except ConfigError as exc:
        _fail_config(exc)

    async def start() -> None:
        await migrate(db, simulator_migrations())  # its own tables only, not the engine's

    app_ = create_mock_app(mock_switch(settings, db), on_start=start, on_stop=db.close)
    config = uvicorn.Config(app_, host=host, port=port, log_config=None, access_log=False)
    graceful_server(config, force_exit=lambda: _exit_at_once(settings)).run()


def _exit_at_once(settings: Settings) -> NoReturn:
    """A second signal during shutdown (``api/shutdown.py``)."""
    from core.embedded import release_embedded

    if settings.embedded:
        release_embedded(settings.data_dir, immediate=True)
    os._exit(1)


@merchant_app.command("create")
def merchant_create(
    name: Annotated[str, typer.Option(help="Merchant's display name")],
    vpa: Annotated[str, typer.Option(help="Merchant's collecting VPA")],
    mcc: Annotated[str, typer.Option(help="Merchant category code")] = "5411",
    webhook_url: Annotated[str | None, typer.Option(help="Final-status webhook URL")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create a merchant; prints its API key and webhook secret (shown once)."""
    from core.pii import VPA_PATTERN

    if not VPA_PATTERN.match(vpa):
        _fail_config(ConfigError("--vpa: not a valid VPA (local-part@handle)"))
    if not (mcc.isdigit() and len(mcc) == 4):
        _fail_config(ConfigError("--mcc: must be 4 digits"))
    settings = _settings()
    if webhook_url is not None:
        from payments.webhook_targets import url_problem

        # Its addresses are checked at every delivery (a name's may change); its form now.
        if (problem := url_problem(webhook_url, production=settings.production)) is not None:
            _fail_config(ConfigError(f"--webhook-url: {problem}"))
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
    from core.pii import VPA_PATTERN, Vpa
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
    from api.bootstrap import Engine, bind_database_master_key, engine_migrations
    from core.storage import migrate

    try:
        engine = Engine.build(settings, [Role.ALL])
    except ConfigError as exc:
        _fail_config(exc)
    try:
        await migrate(engine.db, engine_migrations(settings))
        try:
            await bind_database_master_key(engine.db, engine.master_key, settings)
        except ConfigError as exc:
            _fail_config(exc)
        return await work(engine)
    finally:
        await engine.close_switch_journal()
        await engine.db.close()


async def _with_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``work`` against the database (migrated) without the master key: for what reads
    only signed or sealed data, so that auditors' tooling never needs the key."""
    from api.bootstrap import all_migrations, database_url
    from core.storage import Database, migrate

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


_GRACE_HELP = "Seconds the old ones keep working (0: none)"
_DEFAULT_GRACE_S = 86_400.0


@merchant_app.command("rotate-key")
def merchant_rotate_key(
    merchant: Annotated[str, typer.Option(help="Merchant id (mer_…)")],
    grace: Annotated[float, typer.Option(min=0, help=_GRACE_HELP)] = _DEFAULT_GRACE_S,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """A new API key for the merchant (shown once); its other keys keep working for
    ``--grace`` seconds, then stop."""
    from datetime import timedelta

    from api.auth import Role as PrincipalRole
    from api.auth import rotate_credentials
    from core.storage import sql_text

    settings = _settings()

    async def rotate(engine: Engine) -> dict[str, Any]:
        now = engine.clock.now()
        async with engine.db.transaction() as conn:
            known = (
                await conn.execute(
                    sql_text(
                        "SELECT 1 FROM principals WHERE principal_id = :m AND role = 'merchant'"
                    ),
                    {"m": merchant},
                )
            ).first()
            if known is None:
                raise NotFound(merchant)
            credential_id, token, ends = await rotate_credentials(
                conn, merchant, PrincipalRole.MERCHANT, grace=timedelta(seconds=grace), now=now
            )
        return {
            "merchant_id": merchant,
            "credential_id": credential_id,
            "api_key": token,
            "old_keys_expire_at": _iso(ends),
        }

    rotated = _rotated(settings, rotate, merchant, json)
    out.print(f"api_key  {rotated['api_key']}  ({rotated['credential_id']})")
    out.print(f"the merchant's other keys stop at {rotated['old_keys_expire_at']}")
    out.print("[yellow]The API key is shown once. Store it now.[/]")


def _rotated(
    settings: Settings,
    rotate: Callable[[Engine], Awaitable[dict[str, Any]]],
    merchant: str,
    json: bool,
) -> dict[str, Any]:
    """Run a merchant's rotation; with ``--json`` print it and exit; errors exit 2."""
    try:
        rotated = asyncio.run(_with_engine(settings, rotate))
    except ConfigError as exc:
        _fail_config(exc)
    except NotFound:
        _fail_config(ConfigError(f"--merchant: no merchant {merchant}"))
    if json:
        sys.stdout.write(orjson.dumps(rotated).decode() + "\n")
        raise typer.Exit(0)
    return rotated


@merchant_app.command("rotate-webhook-secret")
def merchant_rotate_webhook_secret(
    merchant: Annotated[str, typer.Option(help="Merchant id (mer_…)")],
    grace: Annotated[float, typer.Option(min=0, help=_GRACE_HELP)] = _DEFAULT_GRACE_S,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """A new webhook secret (shown once). Until ``--grace`` seconds have passed, webhooks
    carry a signature with each secret, so the receiver can switch over."""
    from datetime import timedelta

    from payments.merchants import rotate_webhook_secret

    settings = _settings()

    async def rotate(engine: Engine) -> dict[str, Any]:
        now = engine.clock.now()
        secret = _new_webhook_secret()
        sealed = engine.master_key.seal(secret.encode(), merchant.encode())
        async with engine.db.transaction() as conn:
            secret_id, ends = await rotate_webhook_secret(
                conn, merchant, sealed, grace=timedelta(seconds=grace), now=now
            )
        return {
            "merchant_id": merchant,
            "secret_id": secret_id,
            "webhook_secret": secret,
            "old_secrets_expire_at": _iso(ends),
        }

    rotated = _rotated(settings, rotate, merchant, json)
    out.print(f"webhook_secret  {rotated['webhook_secret']}  ({rotated['secret_id']})")
    out.print(f"the other secrets sign until {rotated['old_secrets_expire_at']}")
    out.print("[yellow]The webhook secret is shown once. Store it now.[/]")


# Listings come in pages (docs/security.md "Pagination"): --limit, then --after the last
# one shown; --json adds next_after (null on the last page).
_LIMIT = typer.Option(min=1, max=1000, help="At most this many (a page)")
_AFTER = typer.Option(help="The next page: the last id shown (next_after)")


def _page(rows: list[dict[str, Any]], limit: int, key: str) -> tuple[list[dict[str, Any]], Any]:
    """The first ``limit`` of ``limit + 1`` rows read, and the cursor of the next page."""
    return rows[:limit], rows[limit - 1][key] if len(rows) > limit else None


def _print_more(next_after: object) -> None:
    if next_after is not None:
        out.print(f"more: --after {next_after}")


@token_app.command("list")
def token_list(
    limit: Annotated[int, _LIMIT] = 100,
    after: Annotated[str | None, _AFTER] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """The credentials, oldest first: id, prefix, role, principal, status, created, expires,
    last used; --limit a page, the next with --after the last id shown."""
    from api.auth import list_credentials

    settings = _settings()

    async def listing(engine: Engine) -> list[dict[str, Any]]:
        now = engine.clock.now()
        async with engine.db.connection() as conn:
            return [c.view(now) for c in await list_credentials(conn, limit=limit + 1, after=after)]

    try:
        found = asyncio.run(_with_engine(settings, listing))
    except ConfigError as exc:
        _fail_config(exc)
    found, next_after = _page(found, limit, "credential_id")
    if json:
        body = {"credentials": found, "next_after": next_after}
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        return
    table = Table(
        "credential", "prefix", "role", "principal", "status", "created", "expires", "last used"
    )
    for c in found:
        table.add_row(
            c["credential_id"],
            c["prefix"] + "…",
            c["role"],
            c["principal_id"],
            c["status"],
            c["created_at"] or "",
            c["expires_at"] or "",
            c["last_used_at"] or "",
        )
    out.print(table)
    _print_more(next_after)


@token_app.command("revoke")
def token_revoke(
    credential_id: Annotated[str, typer.Argument(help="The credential's id (cred_…)")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Revoke a credential at once (every gateway process refuses it within a second)."""
    from api.auth import revoke_credential

    settings = _settings()

    async def revoke(engine: Engine) -> bool:
        async with engine.db.transaction() as conn:
            return await revoke_credential(conn, credential_id, engine.clock.now())

    try:
        now_revoked = asyncio.run(_with_engine(settings, revoke))
    except ConfigError as exc:
        _fail_config(exc)
    except NotFound:
        _fail_config(ConfigError(f"ID: no credential {credential_id}"))
    if json:
        result = {"credential_id": credential_id, "revoked": True, "revoked_now": now_revoked}
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        out.print(f"{credential_id} revoked" + ("" if now_revoked else " (already)"))


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _new_webhook_secret() -> str:
    return "whsec_" + base64.urlsafe_b64encode(os.urandom(32)).decode()


def _bar(message: str, total: float | None, quiet: bool) -> Progress:
    """A bar counting up to ``total``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return _progress(message, quiet, *columns, TimeElapsedColumn(), total=total)


def _print_token(role: PrincipalRole, name: str, json: bool) -> None:
    from api.auth import issue_token

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
    from api.auth import Role as PrincipalRole

    _print_token(PrincipalRole.AUDITOR, name, json)


@operator_app.command("create")
def operator_create(
    name: Annotated[str, typer.Option(help="Operator's name")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create an operator; prints its bearer token (shown once)."""
    from api.auth import Role as PrincipalRole

    _print_token(PrincipalRole.OPERATOR, name, json)


@webhooks_app.command("list")
def webhooks_list(
    status: Annotated[str, typer.Option(help="PENDING, DELIVERED or DEAD")] = "DEAD",
    merchant: Annotated[str | None, typer.Option(help="Only this merchant")] = None,
    limit: Annotated[int, _LIMIT] = 100,
    after: Annotated[int | None, typer.Option(help="The next page: the last id shown")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """List webhook deliveries (by default the dead-lettered ones), by id; --limit a
    page, the next with --after the last id shown."""
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
        if after is not None:
            sql += " AND id > :after"
            params["after"] = after
        params["n"] = limit + 1
        async with engine.db.connection() as conn:
            rows = (await conn.execute(sql_text(sql + " ORDER BY id LIMIT :n"), params)).all()
        return [{**r._asdict(), "created_at": r.created_at.isoformat()} for r in rows]

    rows, next_after = _page(asyncio.run(_with_engine(settings, fetch)), limit, "id")
    if json:
        body = {"status": status, "deliveries": rows, "next_after": next_after}
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
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
    _print_more(next_after)


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
    public_key: Annotated[
        list[Path] | None,
        typer.Option(help="Trust only this checkpoint key (PEM), not the database's; repeatable"),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Recompute the chain, Merkle roots, checkpoint signatures and the stored tree. Exit 0
    valid, 1 invalid.

    Resumes after the last checkpoint a previous run verified, unless --full.
    """
    from compliance.ledger import verify_ledger
    from core.clock import SystemClock

    trusted = _public_keys(public_key, "--public-key") if public_key else None
    settings = _settings()
    with _spinner("verifying the ledger…", json):
        result = asyncio.run(
            _with_database(
                settings,
                lambda db: verify_ledger(db, SystemClock(), full=full, trusted_keys=trusted),
            )
        )
    _print_verification(result, json, "" if full else " (resumed)")


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
def ledger_public_key(
    all_keys: Annotated[
        bool,
        typer.Option("--all", help="Every signing key's, oldest first (after rotations)"),
    ] = False,
) -> None:
    """Print the checkpoint verification key (PEM): the newest signing key's."""
    from compliance.keys import active_signing_key
    from compliance.ledger import public_key_pems
    from core.clock import SystemClock

    settings = _settings()
    pems = asyncio.run(_with_database(settings, public_key_pems))
    if pems:  # no master key needed to read them
        sys.stdout.write("".join(pems.values()) if all_keys else list(pems.values())[-1])
        return

    async def pem(engine: Engine) -> str:  # none yet: made now, which needs the master key
        async with engine.db.transaction() as conn:
            key = await active_signing_key(conn, engine.master_key, SystemClock().now())
        return key.public_pem

    sys.stdout.write(asyncio.run(_with_engine(settings, pem)))


def _pin(text: str) -> tuple[int, bytes]:
    from compliance.verifier import parse_pin

    try:
        return parse_pin(text)
    except ValueError:
        sys.stderr.write(f"error: --pin must be HEIGHT:HEAD_HASH (64 hex digits), not {text}\n")
        raise typer.Exit(2) from None


def _public_keys(paths: list[Path], what: str) -> list[Any]:
    from compliance.verifier import load_public_key

    keys: list[Any] = []
    for path in paths:
        try:
            # A file may hold several keys (`ledger public-key --all`): one PEM block each.
            text = path.read_bytes()
            blocks = [b"-----BEGIN" + part for part in text.split(b"-----BEGIN")[1:]]
            keys.extend(load_public_key(block) for block in blocks or [text])
        except OSError as exc:
            sys.stderr.write(f"error: {what} {path}: {exc.strerror}\n")
            raise typer.Exit(2) from None
        except ValueError:
            sys.stderr.write(f"error: {what} {path}: not an Ed25519 public key in PEM\n")
            raise typer.Exit(2) from None
    return keys


@ledger_app.command("verify-export")
def ledger_verify_export(
    export_file: Annotated[Path, typer.Argument(help="An export (JSON Lines)")],
    public_key: Annotated[
        list[Path], typer.Option(help="Checkpoint verification key (PEM); repeatable")
    ],
    pin: Annotated[
        list[str] | None,
        typer.Option(help="HEIGHT:HEAD_HASH of a checkpoint you hold; repeatable"),
    ] = None,
    witness_key: Annotated[
        list[Path] | None,
        typer.Option(help="A witness whose cosignature is required (PEM); repeatable"),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Verify an export offline: chain, roots, signatures, cosignatures, consistency between
    checkpoints and pins. Needs no database and no key but the public ones.

    Exit 0 valid, 1 invalid (with the first bad height), 2 bad usage."""
    from compliance.verifier import read_export, verify_export

    keys = _public_keys(public_key, "--public-key")
    witnesses = _public_keys(witness_key or [], "--witness-key")
    pins = dict(_pin(p) for p in pin or [])
    if not export_file.is_file():
        sys.stderr.write(f"error: no such export: {export_file}\n")
        raise typer.Exit(2)
    with _spinner("verifying the export…", json):
        try:
            result = verify_export(
                read_export(export_file), keys, pins=pins, witness_keys=witnesses
            )
        except ValueError as exc:  # not JSON Lines at all
            sys.stderr.write(f"error: {export_file} is not an export: {exc}\n")
            raise typer.Exit(2) from None
    _print_verification(result, json)


def _print_verification(result: Any, json: bool, suffix: str = "") -> NoReturn:
    if json:
        sys.stdout.write(orjson.dumps(result.to_dict()).decode() + "\n")
    elif result.valid:
        witnessed = "".join(f", cosigned by {k} up to {h}" for k, h in result.witnessed.items())
        out.print(
            f"[green]valid[/]: {result.entries} entries, {result.checkpoints} checkpoints"
            + witnessed
            + suffix
        )
    else:
        out.print(f"[red]INVALID[/] at height {result.first_bad_height}: {result.reason}")
    raise typer.Exit(0 if result.valid else 1)


@ledger_app.command("witness")
def ledger_witness(
    url: Annotated[str, typer.Option(help="The engine's base URL")],
    token: Annotated[str, typer.Option(help="An auditor token", envvar="UPI_WITNESS_TOKEN")],
    key_file: Annotated[Path, typer.Option(help="This witness's Ed25519 key (made if absent)")],
    state_file: Annotated[
        Path | None, typer.Option(help="The last checkpoint accepted (default KEY_FILE.state.json)")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One round, then exit (for cron)")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between rounds")] = 10.0,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per round")] = False,
) -> None:
    """An independent witness: checks each new checkpoint's signature and its consistency
    with the last one accepted, then cosigns it. On a fork, a rollback or a bad signature
    it refuses, writes the evidence beside its state file and exits 1."""
    from compliance.verifier import witness_key_id
    from compliance.witness_client import (
        WitnessAlarm,
        WitnessError,
        WitnessRound,
        load_or_create_key,
        public_file,
        run_witness,
        state_path_for,
    )
    from core.logging import configure_logging

    configure_logging("INFO")
    try:
        key, created = load_or_create_key(key_file)
    except (OSError, ValueError, WitnessError) as exc:
        sys.stderr.write(f"error: --key-file {key_file}: {exc}\n")
        raise typer.Exit(2) from None
    key_id = witness_key_id(key.public_key())
    if created:
        err_console.print(
            f"witness key {key_id} created; its public key is {public_file(key_file)}"
        )

    def on_round(done: WitnessRound) -> None:
        if json:
            body = {"witness_key_id": key_id, **done.to_dict()}
            sys.stdout.write(orjson.dumps(body).decode() + "\n")
            sys.stdout.flush()
        else:
            out.print(
                f"checkpoint {done.height}: {done.reason}"
                + (" [green]cosigned[/]" if done.cosigned else "")
            )

    try:
        asyncio.run(
            run_witness(
                url.rstrip("/"),
                token,
                key_file,
                state_file or state_path_for(key_file),
                once=once,
                interval_s=interval,
                on_round=on_round,
            )
        )
    except WitnessAlarm as exc:
        sys.stderr.write(f"ALARM: {exc}\n")
        raise typer.Exit(1) from None
    except WitnessError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(1) from None


@ledger_app.command("add-witness")
def ledger_add_witness(
    name: Annotated[str, typer.Option(help="Who runs it")],
    public_key: Annotated[Path, typer.Option(help="The witness's public key (PEM)")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Register a witness whose cosignatures the engine accepts and exports."""
    from compliance.witnesses import register_witness

    [_key] = _public_keys([public_key], "--public-key")
    settings = _settings()
    pem = public_key.read_text()
    witness = asyncio.run(
        _with_database(
            settings, lambda db: register_witness(db, datetime.now(UTC), name=name, public_pem=pem)
        )
    )
    if json:
        body = {"witness_key_id": witness.witness_key_id, "name": witness.name}
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
    else:
        out.print(f"witness {witness.name}: {witness.witness_key_id}")


@ledger_app.command("witnesses")
def ledger_witnesses(
    limit: Annotated[int, _LIMIT] = 100,
    after: Annotated[str | None, _AFTER] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """The registered witnesses, oldest first, and the newest checkpoint each cosigned;
    --limit a page, the next with --after the last key id shown."""
    from compliance.witnesses import list_witnesses

    found = asyncio.run(
        _with_database(_settings(), lambda db: list_witnesses(db, limit=limit + 1, after=after))
    )
    rows, next_after = _page(
        [
            {"witness_key_id": w.witness_key_id, "name": w.name, "last_cosigned": w.last_cosigned}
            for w in found
        ],
        limit,
        "witness_key_id",
    )
    if json:
        sys.stdout.write(
            orjson.dumps({"witnesses": rows, "next_after": next_after}).decode() + "\n"
        )
        return
    table = Table("witness", "key id", "last cosigned")
    for r in rows:
        table.add_row(str(r["name"]), str(r["witness_key_id"]), str(r["last_cosigned"] or "—"))
    out.print(table)
    _print_more(next_after)


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


@keys_app.command("rotate-signing")
def keys_rotate_signing(
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Make a new checkpoint signing key active. Checkpoints name the key that signed them;
    the old public keys stay (`ledger public-key --all`), so older checkpoints still
    verify. Give auditors the new public key. Safe beside a running serve."""
    from compliance.keys import rotate_signing_key
    from core.clock import SystemClock

    settings = _settings()

    async def rotate(engine: Engine) -> tuple[str, str]:
        async with engine.db.transaction() as conn:
            key = await rotate_signing_key(conn, engine.master_key, SystemClock().now())
        return key.key_id, key.public_pem

    key_id, pem = asyncio.run(_with_engine(settings, rotate))
    if json:
        sys.stdout.write(orjson.dumps({"signing_key_id": key_id, "public_pem": pem}).decode())
        sys.stdout.write("\n")
    else:
        out.print(f"new checkpoint signing key {key_id}; its public key:")
        sys.stdout.write(pem)


@keys_app.command("rotate-master")
def keys_rotate_master(
    new_key_file: Annotated[
        Path | None,
        typer.Option(
            "--new-key-file",
            help="The new master key (base64 of 32 bytes, mode 0600). Default: a new key"
            " replaces the key file in use (the embedded master.key or UPI_MASTER_KEY_FILE)",
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Re-wrap every secret under a new master key: data keys, signing keys, webhook secrets,
    dispute evidence and the pseudonym key, in one transaction. Nothing opens under the old
    key afterwards. Stop every engine process first (it refuses while one is connected)."""
    settings = _settings()
    try:
        where, rewrapped = _rotate_master(settings, new_key_file)
    except ConfigError as exc:
        _fail_config(exc)
    if json:
        sys.stdout.write(orjson.dumps({"key_file": where, "rewrapped": rewrapped}).decode() + "\n")
        return
    total = sum(int(str(r["values"])) for r in rewrapped)
    out.print(f"re-wrapped {total} sealed values under the new master key ({where})")
    if new_key_file is not None:
        out.print(
            "now point UPI_MASTER_KEY_FILE (or UPI_MASTER_KEY) at the new key, start the"
            " engine, and destroy every copy of the old key"
        )


def _rotate_master(
    settings: Settings, new_key_file: Path | None
) -> tuple[str, list[dict[str, object]]]:
    """`keys rotate-master`: (where the new key is, the values re-wrapped per column)."""
    return asyncio.run(
        _with_engine(settings, lambda engine: _rotate_master_on(engine, settings, new_key_file))
    )


async def _rotate_master_on(
    engine: Engine, settings: Settings, new_key_file: Path | None
) -> tuple[str, list[dict[str, object]]]:
    """Re-wrap every sealed value under a new master key, with an engine already bound to
    the database; then the new key file replaces the old one."""
    from api.bootstrap import sealed_columns
    from core.crypto import master_key_file, read_key_file, write_key_file
    from core.keyring import rotate_master_key
    from core.storage import APPLICATION_NAME, sql_text

    current = master_key_file(settings)
    if new_key_file is None and current is None:
        raise ConfigError("--new-key-file: required when the key is in UPI_MASTER_KEY")
    pending: Path | None = None
    if new_key_file is not None:
        new = read_key_file(new_key_file, f"--new-key-file {new_key_file}")
    else:
        assert current is not None
        pending = current.with_name(current.name + ".new")
        pending.unlink(missing_ok=True)  # a rotation that never committed
        new = write_key_file(pending)
    try:
        async with engine.db.transaction() as conn:
            others = (
                await conn.execute(
                    sql_text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name LIKE 'upi-engine:%' AND application_name <> :me"
                    ),
                    {"me": APPLICATION_NAME},
                )
            ).scalar_one()
            if others:
                raise ConfigError(
                    f"keys rotate-master: {others} connections of other engine processes;"
                    " stop serve (and every role) first, they would keep the old key"
                )
            done = await rotate_master_key(conn, engine.master_key, new, sealed_columns())
    except BaseException:
        if pending is not None:
            pending.unlink(missing_ok=True)
        raise
    if pending is not None and current is not None:
        os.replace(pending, current)  # committed: the new key replaces the old file
    rewrapped: list[dict[str, object]] = [{"column": r.column, "values": r.values} for r in done]
    return str(current) if new_key_file is None else str(new_key_file), rewrapped


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

    async def shred(engine: Engine) -> tuple[list[str], bool, str]:
        async with engine.db.transaction() as conn:
            destroyed = await shred_data_keys(
                conn, SystemClock().now(), timedelta(days=retention_days)
            )
        if not destroyed:
            return destroyed, False, "nothing was shredded"
        # Old copies of the shredded keys' wrapped form (row versions, WAL, backups,
        # standbys) open under the master key: a new master key makes them useless.
        try:
            await _rotate_master_on(engine, settings, None)
        except ConfigError as exc:
            return destroyed, False, f"run `upi-engine keys rotate-master` next ({exc})"
        return destroyed, True, "the master key was rotated"

    destroyed, rotated, why = asyncio.run(_with_engine(settings, shred))
    if json:
        sys.stdout.write(
            orjson.dumps(
                {"destroyed": destroyed, "master_rotated": rotated, "master": why}
            ).decode()
            + "\n"
        )
    else:
        out.print(f"destroyed {len(destroyed)} data keys: {', '.join(destroyed) or '-'}")
        if destroyed:
            (out if rotated else err_console).print(why)


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
    scenario: Annotated[
        str, typer.Option(help="primary-loss | standby-loss | failback | primary-freeze")
    ],
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


@settlement_app.command("switch-data")
def settlement_switch_data(
    business_date: Annotated[str, typer.Option(help="IST business date, YYYY-MM-DD")],
    ref: Annotated[
        list[str] | None, typer.Option(help="A reference to include whatever its date; repeatable")
    ] = None,
) -> None:
    """Print the switch's settlement data for a date as one JSON object: the rows for each
    --ref, plus every debit the switch shows on that date. Asked through the switch port:
    the in-process mock's, or the switch's at UPI_NPCI_URL (what settlement reconciles
    against; the DR drill counts duplicate debits from it)."""
    from datetime import date as date_

    try:
        day = date_.fromisoformat(business_date)
    except ValueError:
        _fail_config(ConfigError("--business-date: not a YYYY-MM-DD date"))
    settings = _settings()

    async def read(engine: Engine) -> Any:
        return await engine.settlement_data().settlement_data(day, ref or [])

    rows = asyncio.run(_with_engine(settings, read))
    body = {"business_date": day.isoformat(), "rows": [r.__dict__ for r in rows]}
    sys.stdout.write(orjson.dumps(body).decode() + "\n")


@settlement_app.command("run")
def settlement_run(
    business_date: Annotated[str, typer.Option(help="IST business date to close, YYYY-MM-DD")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for DATE/ files")] = Path(
        "settlements"
    ),
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview",
            help="Compute the files as of now into DIR/DATE-preview/ and close nothing"
            " (an open date's cycles so far)",
        ),
    ] = False,
) -> None:
    """Close a business date: inter-bank nets, merchant payouts, reconciliation (SPEC §7).

    Running it again gives identical files; a date must be over (IST) to be closed.
    ``--preview`` shows any date so far, today's included, without closing it.
    """
    from datetime import date as date_

    from api.bootstrap import holiday_calendar, settlement_cycles
    from core.clock import SystemClock
    from core.clock import business_date as ist_date
    from settlement.journal import ComplianceLedgerIndex
    from settlement.run import settle_business_date, write_files

    try:
        day = date_.fromisoformat(business_date)
    except ValueError:
        _fail_config(ConfigError("--business-date: not a YYYY-MM-DD date"))
    clock = SystemClock()
    if day >= ist_date(clock.now()) and not preview:
        _fail_config(ConfigError(f"--business-date: {day} is not over yet in IST"))
    settings = _settings()
    try:
        calendar = holiday_calendar(settings)
        cycles = settlement_cycles(settings)
    except ConfigError as exc:
        _fail_config(exc)

    async def run(engine: Engine) -> Any:
        return await settle_business_date(
            engine.db,
            engine.switch_journal(),
            day,
            ledger=ComplianceLedgerIndex(engine.db),
            calendar=calendar,
            mdr_bps=settings.settlement_mdr_bps,
            clock=clock,
            cycles=cycles,
            preview=preview,
        )

    result = asyncio.run(_with_engine(settings, run))
    target = write_files(result, out_dir)
    if json:
        sys.stdout.write(
            orjson.dumps(
                {
                    **result.summary,
                    "out_dir": str(target),
                    "closed_now": result.closed_now,
                    "preview": result.preview,
                }
            ).decode()
            + "\n"
        )
        return
    s = result.summary
    done = "preview of" if result.preview else "closed" if result.closed_now else "already closed"
    out.print(f"{done} {day}; settles on {s['settlement_date']}; files in {target}")
    out.print(
        f"payments {s['payments']}  gross {s['gross_paise']}  refunds {s['refunds_paise']}"
        f"  net payout {s['net_payout_paise']} (paise)"
    )
    out.print(f"reconciliation {s['reconciliation']}")


@app.command("top")
def top(
    url: Annotated[list[str] | None, typer.Option(help="An engine's base URL; repeatable")] = None,
    once: Annotated[bool, typer.Option("--once", help="One window, then exit")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds per window")] = 2.0,
    json: Annotated[
        bool, typer.Option("--json", help="Print JSON (with --once: one object)")
    ] = False,
) -> None:
    """A live view of running engines from their /metrics: rates, latencies, consumer lag,
    dead letters, deemed backlog, the ledger, the database's DR role. Ctrl-C to stop."""
    import httpx
    from rich.live import Live

    from api.top import Snapshot, scrape, summarize

    urls = [u.rstrip("/") for u in (url or ["http://127.0.0.1:8000"])]

    async def window(client: httpx.AsyncClient, before: dict[str, Snapshot]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for u in urls:
            try:
                now = await scrape(client, u)
            except (httpx.HTTPError, ValueError) as exc:
                results[u] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                before.pop(u, None)
                continue
            results[u] = summarize(before[u], now) if u in before else None
            before[u] = now
        return results

    async def run() -> None:
        before: dict[str, Snapshot] = {}
        async with httpx.AsyncClient(timeout=5) as client:
            await window(client, before)
            if once:
                await asyncio.sleep(interval)
                found = await window(client, before)
                if json:
                    body = {"engines": [{"url": u, **(found[u] or {})} for u in urls]}
                    sys.stdout.write(orjson.dumps(body).decode() + "\n")
                else:
                    out.print(_top_table(found))
                failed = any("error" in (found[u] or {}) for u in urls)
                raise typer.Exit(1 if failed else 0)
            with Live(_top_table({u: None for u in urls}), console=out, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(interval)
                    found = await window(client, before)
                    if json:
                        for u in urls:
                            line = {"url": u, **(found[u] or {})}
                            sys.stdout.write(orjson.dumps(line).decode() + "\n")
                        sys.stdout.flush()
                    else:
                        live.update(_top_table(found), refresh=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return


def _top_table(found: dict[str, Any]) -> Table:
    table = Table(title="upi-engine top")
    table.add_column("")
    for u in found:
        table.add_column(u, justify="right")
    rows: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("accepted/s", lambda s: s["accepted_per_s"]),
        ("final/s", lambda s: ", ".join(f"{k} {v}" for k, v in s["final_per_s"].items()) or "0"),
        ("5xx/s", lambda s: s["http_5xx_per_s"]),
        ("202 p50 / p99 ms", lambda s: f"{s['accepted_p50_ms']} / {s['accepted_p99_ms']}"),
        ("fraud p99 ms", lambda s: s["fraud_p99_ms"]),
        ("consumer lag", lambda s: ", ".join(f"{k} {v}" for k, v in s["consumer_lag"].items())),
        ("dead letters", lambda s: sum(s["dead_letters"].values())),
        ("outbox backlog", lambda s: s["outbox_backlog"]),
        ("deemed", lambda s: s["deemed_payments"]),
        ("ledger entries", lambda s: s["ledger_size"]),
        ("checkpoint age s", lambda s: s["ledger_checkpoint_age_s"]),
        ("ledger valid", lambda s: s["ledger_valid"]),
        ("database", lambda s: s["database_role"]),
        ("DR standbys", lambda s: s["dr_standbys"]),
    ]
    for name, pick in rows:
        cells = []
        for summary in found.values():
            if summary is None:
                cells.append("…")
            elif "error" in summary:
                cells.append("[red]down[/]" if name == "accepted/s" else "")
            else:
                value = pick(summary)
                cells.append("—" if value is None or value == "" else str(value))
        table.add_row(name, *cells)
    return table


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
        int | None,
        typer.Option(
            min=1,
            max=8,
            help="memory: HTTP processes of one serve (UPI_GATEWAY_PROCESSES; default: as"
            " auto); kafka: 1 every role in one (default), 2 gateway | workers",
        ),
    ] = None,
    switch_latency_scale: Annotated[
        float,
        typer.Option(min=0, max=10, help="The mock switch's bank latencies x this (0: none)"),
    ] = 1.0,
    traces: Annotated[
        int,
        typer.Option(
            min=0,
            max=10,
            help="Also run the engine N more times tracing every process to a local OTLP"
            " sink, interleaved with runs tracing off: traces off vs on in the same run",
        ),
    ] = 0,
    trace_sample_ratio: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="With --traces: UPI_OTEL_SAMPLE_RATIO (default: the engine's, 0.1)",
        ),
    ] = None,
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
    if processes is None:
        from core.config import auto_gateway_processes

        processes = auto_gateway_processes() if bus == "memory" else 1
    if processes > 2 and bus == "kafka":
        err_console.print("--bus kafka runs 1 process (every role) or 2 (gateway | workers)")
        raise typer.Exit(2)
    if (rate is None) != (duration is None):
        err_console.print("the open loop needs both --rate and --duration")
        raise typer.Exit(2)
    if rate is not None and payments is not None:
        err_console.print("--payments is the closed loop, --rate/--duration the open one: not both")
        raise typer.Exit(2)
    if bus == "kafka" and not os.environ.get("UPI_KAFKA_BOOTSTRAP"):
        err_console.print("bench: --bus kafka needs UPI_KAFKA_BOOTSTRAP (the broker to use)")
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
                    trace_rounds=traces,
                    trace_sample_ratio=trace_sample_ratio,
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
    traced = result.pop("traces", None)
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
    if traced is not None:
        rounds = traced.pop("rounds")
        _measures(f"traces off vs on (sample ratio {traced['sample_ratio']:g})", _flat(traced))
        for n, pair in enumerate(rounds, 1):
            _measures(f"traces, round {n}", pair.items())


@db_app.command("url")
def db_url() -> None:
    """Print the database URL in use.

    Embedded: the running server's socket URL. If no process runs the server, it is not
    started (it would stop again when this command exits): say so and exit 1.
    """
    from core.embedded import embedded_url_if_running
    from core.storage import plain_url

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
    exit_on_sigterm()
    app()
