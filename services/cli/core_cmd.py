"""Core commands: fetch offline assets, list strategies."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tad` app."""

    @app.command()
    def fetch(model: list[str] = typer.Option(["smollm2-135m-instruct"], help="registered base models to prepare"),
              data: bool = typer.Option(True, help="also fetch the evaluation datasets")) -> None:
        """Fetch (idempotently) the embedded model(s) and the offline datasets into the cache."""
        from tad_core.assets import AssetError
        from tad_core.models import ModelLoadError, licence_info, resolve_base_dir

        for name in model:
            try:
                model_dir = resolve_base_dir(name)
            except (AssetError, ModelLoadError) as e:
                typer.secho(f"error: model {name}: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1) from None
            lic = licence_info(model_dir)
            note = f"  (licence: {lic['licence']}, {model_dir / lic['licence_file']})" if lic else ""
            typer.echo(f"model {name}: {model_dir}{note}")
        if data:
            from tad_core.datasets import fetch_all

            fetch_all()

    @app.command()
    def formats(as_json: bool = typer.Option(False, "--json", help="print JSON instead of text")) -> None:
        """List the prompt formats (name@version, parameters) with a rendered example of each."""
        import json

        from rich.console import Console
        from rich.markup import escape

        from tad_core.formats import REGISTRY, example

        rows = [{"name": cls.name, "key": cls().key, "description": cls.description, "example": example(cls())}
                for cls in REGISTRY.values()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        console = Console(width=120)
        for r in rows:
            console.rule(f"[bold]{escape(r['key'])}[/bold]: {escape(r['description'])}")
            console.print(escape(r["example"]), highlight=False)

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
