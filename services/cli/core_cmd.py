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
            from tad_core.datasets.olmo import fetch_all

            fetch_all()
