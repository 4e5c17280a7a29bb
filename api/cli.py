"""The ``upi-engine`` command line (SPEC §3). Exit codes: 0 ok, 1 a check failed, 2 bad
usage or configuration."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from typing import Annotated, NoReturn

import orjson
import typer
from rich.console import Console

from api.auth import Role as PrincipalRole
from api.auth import issue_token
from api.bootstrap import Engine, Role
from core.config import Settings, load_settings
from core.embedded import embedded_url_if_running
from core.errors import ConfigError
from core.ids import new_merchant_id
from core.logging import configure_logging
from core.pii import VPA_PATTERN
from core.storage import migrate, plain_url

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="UPI payment event engine")
merchant_app = typer.Typer(no_args_is_help=True, help="Merchants")
db_app = typer.Typer(no_args_is_help=True, help="Database")
app.add_typer(merchant_app, name="merchant")
app.add_typer(db_app, name="db")

out = Console()


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
) -> None:
    """Run the API and/or workers."""
    import uvicorn

    from api.http import create_app

    settings = _settings()
    try:
        engine = Engine.build(settings, role or [Role.ALL])
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
    uvicorn.Server(config).run()


async def _create_merchant(
    settings: Settings, name: str, vpa: str, mcc: str, webhook_url: str | None
) -> dict[str, str]:
    from payments.merchants import Merchant, insert_merchant

    engine = Engine.build(settings, [Role.ALL])
    try:
        from api.bootstrap import all_migrations

        await migrate(engine.db, all_migrations())
        merchant_id = new_merchant_id()
        webhook_secret = "whsec_" + base64.urlsafe_b64encode(os.urandom(32)).decode()
        sealed = engine.master_key.seal(webhook_secret.encode(), merchant_id.encode())
        async with engine.db.transaction() as conn:
            await insert_merchant(
                conn, Merchant(merchant_id, name, vpa.lower(), mcc, webhook_url), sealed
            )
            api_key = await issue_token(
                conn,
                principal_id=merchant_id,
                role=PrincipalRole.MERCHANT,
                name=name,
                merchant_id=merchant_id,
            )
    finally:
        await engine.db.close()
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
    if not (mcc.isdigit() and len(mcc) == 4):
        _fail_config(ConfigError("--mcc: must be 4 digits"))
    settings = _settings()
    try:
        created = asyncio.run(_create_merchant(settings, name, vpa, mcc, webhook_url))
    except ConfigError as exc:
        _fail_config(exc)
    if json:
        sys.stdout.write(orjson.dumps(created).decode() + "\n")
        return
    out.print(f"merchant_id     {created['merchant_id']}")
    out.print(f"api_key         {created['api_key']}")
    out.print(f"webhook_secret  {created['webhook_secret']}")
    out.print("[yellow]The API key and webhook secret are shown once. Store them now.[/]")


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
