"""`tad data fetch|list|validate`: the offline datasets and the canonical JSONL format."""
from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _table(infos: list, title: str):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title=title)
    for col in ("name", "task", "splits", "samples", "status"):
        table.add_column(col, justify="right" if col == "samples" else "left")
    for info in infos:
        table.add_row(info.name, info.task_type, ", ".join(f"{s} {n}" for s, n in info.splits.items()),
                      str(sum(info.splits.values())), "cached" if info.fetched else "not fetched")
    return table


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the `tad` app."""
    data_app = typer.Typer(help="Offline datasets: fetch, list, validate canonical JSONL files.",
                           no_args_is_help=True)

    @data_app.command("fetch")
    def fetch(progress: bool = typer.Option(True, help="show a progress bar")) -> None:
        """Materialise the registered datasets into the cache (idempotent)."""
        import time

        from rich.console import Console

        from tad_core.assets import AssetError
        from tad_core.datasets import DatasetFetchError, fetch_all

        started = time.time()
        try:
            infos = fetch_all(progress=progress)
        except (AssetError, DatasetFetchError, OSError) as e:
            _fail(str(e))
        Console().print(_table(infos, f"datasets ({time.time() - started:.1f} s)"))

    @data_app.command("list")
    def list_() -> None:
        """Show the registered datasets with their splits and sample counts."""
        from rich.console import Console

        from tad_core.datasets import list_datasets

        Console().print(_table(list_datasets(), "datasets"))

    @data_app.command("validate")
    def validate(file: Path = typer.Argument(..., help="a canonical JSONL dataset file")) -> None:
        """Check a JSONL file against the canonical format; exit code 1 and every error if it is rejected."""
        from tad_core.datasets import DatasetValidationError, validate_jsonl

        try:
            samples = validate_jsonl(file)
        except DatasetValidationError as e:
            _fail(str(e))
        kinds = {s.kind for s in samples}
        typer.echo(f"ok: {len(samples)} samples ({'/'.join(sorted(kinds))})")

    app.add_typer(data_app, name="data")
