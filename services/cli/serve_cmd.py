"""`tad serve`: the HTTP API (services.api) under uvicorn, for a team deployment.

The server holds the database and broker credentials; its users hold API tokens (`tad tokens create`).
"""
from __future__ import annotations

from typing import Annotated

import typer

from services.cli.common import check_schema, cli_settings, user_errors


def register(app: typer.Typer) -> None:
    """Add `tad serve` to the `tad` app."""

    @app.command()
    def serve(host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
              port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
              log_level: Annotated[str, typer.Option("--log-level")] = "info") -> None:
        """Start the HTTP API (OpenAPI schema at /openapi.json, interactive docs at /docs)."""
        import uvicorn

        from services.api import create_app

        settings = cli_settings()
        with user_errors():
            check_schema(settings, migrate_embedded=True)
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, proxy_headers=True)
