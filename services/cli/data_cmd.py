"""`tad data fetch|list|validate|import-lmeval`: the offline datasets and the canonical JSONL format."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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
    def list_(as_json: bool = typer.Option(False, "--json", help="print the list as JSON (name, task_type, "
                                           "splits, source, path, fetched, description)")) -> None:
        """Show the registered datasets with their splits and sample counts."""
        from tad_core.datasets import list_datasets

        infos = list_datasets()
        if as_json:
            import dataclasses
            import json

            typer.echo(json.dumps([{**dataclasses.asdict(i), "path": str(i.path)} for i in infos]))
            return
        from rich.console import Console

        Console().print(_table(infos, "datasets"))

    @data_app.command("validate")
    def validate(file: Path = typer.Argument(..., help="a dataset file: canonical JSONL, or a .json array of the "
                                             "same objects")) -> None:
        """Check a dataset file against the canonical format, exactly as `tad run` and `tad submit` do (the same
        TAD_MAX_DATASET_BYTES / _ROWS and TAD_MAX_SAMPLE_CHARS limits); exit code 2 (bad input, as for every
        command) with the errors (up to 50) named by line (array item) and field."""
        from collections import Counter

        from tad_core.datasets import DatasetValidationError
        from tad_core.datasets.user_files import validate_file

        from services.dataset_input import dataset_limits
        from services.settings import get_settings

        try:
            samples, splits = validate_file(file, dataset_limits(get_settings()))
        except DatasetValidationError as e:
            _fail(str(e), code=2)
        kinds = {s.kind for s in samples}
        per_split = ", ".join(f"{k} {n}" for k, n in Counter(splits).items()) if splits and splits[0] else ""
        typer.echo(f"ok: {len(samples)} samples ({'/'.join(sorted(kinds))})" + (f"; splits: {per_split}"
                                                                              if per_split else ""))

    @data_app.command("import-lmeval")
    def import_lmeval(
        task_yaml: Path = typer.Argument(..., help="an lm-evaluation-harness task YAML (local data files)"),
        out: Path = typer.Option(..., "--out", "-o", help="the canonical JSONL file to write"),
        split: Optional[str] = typer.Option(None, help="data split (default: the task's test_split, else "
                                            "validation_split)"),
        include_path: Optional[list[Path]] = typer.Option(None, "--include-path", help="directory searched for "
                                                          "`include`d YAMLs, repeatable"),
        fewshot_seed: int = typer.Option(1234, help="seed of the default (random) few-shot sampler, as lm-eval's "
                                          "--fewshot_random_seed"),
        filter_name: Optional[str] = typer.Option(None, "--filter", help="the filter_list pipeline to score, "
                                                  "when the task has several"),
    ) -> None:
        """Convert a local lm-eval task YAML into a canonical JSONL file; exit code 2 naming the key on bad YAML."""
        from tad_core.datasets import DatasetValidationError, write_jsonl
        from tad_core.lmeval import LmEvalTaskError, convert_task, validated

        try:
            conv = convert_task(task_yaml, split, include_path or (), fewshot_seed, filter_name)
            validated(conv)  # the file must load anywhere a dataset is accepted
        except (LmEvalTaskError, DatasetValidationError, OSError) as e:
            _fail(str(e), code=2)
        write_jsonl(conv.samples, out)
        typer.echo(f"ok: {len(conv.samples)} samples of task {conv.task} ({conv.output_type}, split {conv.split}, "
                   f"{conv.num_fewshot}-shot) -> {out}")
        for src in conv.sources:
            typer.echo(f"  {src.role}: {src.path} sha256={src.sha256}")
        for note in conv.notes:
            typer.echo(f"  note: {note}")

    app.add_typer(data_app, name="data")
