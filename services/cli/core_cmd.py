"""Core commands: fetch offline assets, list strategies."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tad` app."""

    @app.command()
    def fetch(model: list[str] = typer.Option(["smollm2-135m-instruct"], help="registered base models to prepare"),
              data: bool = typer.Option(True, help="also fetch the evaluation datasets")) -> None:
        """Fetch (idempotently) the embedded model(s) and the offline datasets into the cache."""
        from tad_core.models import resolve_base_dir

        for name in model:
            typer.echo(f"model {name}: {resolve_base_dir(name)}")
        if data:
            from tad_core.datasets import fetch_all

            fetch_all()

    @app.command()
    def strategies(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
        """List every registered decoding strategy with its parameters, defaults and description."""
        import json

        from rich.console import Console
        from rich.table import Table

        from tad_core.strategies import describe_strategies

        rows = describe_strategies()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(title="decoding strategies")
        for col in ("name", "needs", "parameters (default)", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            params = "\n".join(f"{k}={v['default']}: {v['help']}" for k, v in r["params"].items()) or "-"
            table.add_row(r["name"], "+".join(r["needs"]), params, r["description"])
        Console(width=160).print(table)
