"""Admin-side commands for the HTTP API's identities: `tad users add|list`, `tad tokens create|list|revoke`.

They talk to the database directly (whoever runs them holds the DB credentials); everyone else gets a token and
uses the API (`tad serve`, `--server`). A token is printed once, on stdout alone, so `TOKEN=$(tad tokens create
ci)` captures it; the database keeps only its sha256.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Any

import typer

from services.refs import MAX_ID

from services.cli.common import cell, check_schema, cli_settings, fail, json_default, user_errors


@contextmanager
def _admin_session() -> Iterator[Any]:
    """A committed session on a current-schema DB; DB trouble and `UserError` (unknown user, bad scope, ...) end
    the command with one line and the usage exit code."""
    from services.db import users
    from services.db.session import session_scope

    settings = cli_settings()
    with user_errors():
        check_schema(settings, migrate_embedded=True)
        try:
            with session_scope(settings) as s:
                yield s
        except users.UserError as e:
            fail(str(e))


def register(app: typer.Typer) -> None:
    """Add the `users` and `tokens` command groups to the `tad` app."""
    users_app = typer.Typer(help="API users (admin side: needs the database).", no_args_is_help=True)
    tokens_app = typer.Typer(help="API tokens (admin side: needs the database).", no_args_is_help=True)
    app.add_typer(users_app, name="users")
    app.add_typer(tokens_app, name="tokens")

    @users_app.command("add")
    def users_add(name: str, admin: Annotated[bool, typer.Option("--admin", help="may create admin tokens: "
                                                                 "cancel/requeue any job, promote adapters")] = False
                  ) -> None:
        """Create an API user."""
        from services.db import users

        with _admin_session() as s:
            user = users.add_user(s, name, is_admin=admin)
        typer.echo(f"user {user.name} (id {user.id}){' admin' if user.is_admin else ''} created", err=True)

    @users_app.command("list")
    def users_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List API users."""
        from rich.console import Console
        from rich.table import Table

        from services.db import users

        with _admin_session() as s:
            rows = users.list_users(s)
        if as_json:
            typer.echo(json.dumps([asdict(u) for u in rows], default=json_default))
            return
        table = Table()
        for col in ("id", "name", "admin", "created"):
            table.add_column(col)
        for u in rows:
            table.add_row(str(u.id), cell(u.name), "yes" if u.is_admin else "", u.created_at.strftime("%Y-%m-%d %H:%M"))
        Console(width=120).print(table)

    @tokens_app.command("create")
    def tokens_create(name: str, scope: Annotated[str, typer.Option("--scope", help="submit | admin")] = "submit"
                      ) -> None:
        """Create a token for user NAME and print it once (only its hash is stored)."""
        from services.db import users

        with _admin_session() as s:
            new = users.create_token(s, name, scope)
        typer.echo(f"token {new.info.id} ({new.info.scope}) for {new.info.user}: shown once, store it now", err=True)
        typer.echo(new.secret)

    @tokens_app.command("list")
    def tokens_list(user: Annotated[str | None, typer.Option("--user", help="only this user's tokens")] = None,
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List tokens (never their secrets)."""
        from rich.console import Console
        from rich.table import Table

        from services.db import users

        with _admin_session() as s:
            rows = users.list_tokens(s, user)
        if as_json:
            typer.echo(json.dumps([asdict(t) for t in rows], default=json_default))
            return
        table = Table()
        for col in ("id", "user", "scope", "created", "last used", "revoked"):
            table.add_column(col)
        fmt = "%Y-%m-%d %H:%M"
        for t in rows:
            table.add_row(str(t.id), cell(t.user), t.scope, t.created_at.strftime(fmt),
                          t.last_used_at.strftime(fmt) if t.last_used_at else "-",
                          t.revoked_at.strftime(fmt) if t.revoked_at else "")
        Console(width=120).print(table)

    @tokens_app.command("revoke")
    def tokens_revoke(token_id: Annotated[int, typer.Argument(min=1, max=MAX_ID)]) -> None:
        """Revoke a token: the API refuses it (401) from the next request on."""
        from services.db import users

        with _admin_session() as s:
            info = users.revoke_token(s, token_id)
        typer.echo(f"token {info.id} of {info.user} revoked at {info.revoked_at:%Y-%m-%d %H:%M:%S}")
