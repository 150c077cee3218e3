"""`tad train`: fine-tune a LoRA / IA3 / prefix-tuning adapter on a dataset's train split."""
from __future__ import annotations

from pathlib import Path

import typer

from services.cli.common import EXIT_USAGE, DatasetNameOpt, ShuffleOpt


def register(app: typer.Typer) -> None:
    """Add the `train` command to the `tad` app."""

    @app.command()
    def train(
        out: Path = typer.Option(..., "--out", help="adapter output directory"),
        dataset: str = typer.Option("arc_easy", help="registered dataset name, FILE.jsonl / FILE.json (rows may "
                                    "carry a split), NAME=train.jsonl,val.jsonl or lmeval:TASK.yaml"),
        datasets: str | None = typer.Option(None, "--datasets", help="comma list of datasets for one multi-task "
                                            "adapter (e.g. boolq,piqa,siqa,hellaswag,winogrande,arc_easy,"
                                            "arc_challenge,openbookqa); overrides --dataset"),
        fmt: str = typer.Option("mc-loglik", "--format", help="prompt format of the training pairs (tad formats)"),
        loss: str = typer.Option("response", "--loss", help="response: loss on the target only; all: whole sequence"),
        split: str = typer.Option("train", help="split to train on"),
        method: str = typer.Option("lora", help="lora, ia3 or prefix"),
        steps: int = typer.Option(200, help="optimizer steps"),
        train_size: int = typer.Option(500, "--train-size", help="samples drawn (seeded) from the split of EACH "
                                       "dataset"),
        seed: int = typer.Option(0, min=0, max=2**63 - 1, help="seed for the subset, batch order and initialisation"),
        base: str = typer.Option("smollm2-135m-instruct", help="registered base model, model dir or .gguf file"),
        lr: float | None = typer.Option(None, help="learning rate (default depends on the method)"),
        batch_size: int = typer.Option(8, "--batch-size", help="samples per step"),
        max_length: int = typer.Option(256, "--max-length", help="tokens per row (context cut from the left)"),
        threads: int = typer.Option(1, help="torch threads while training (1: reproducible bytes, best on a shared CPU)"),
        progress: bool = typer.Option(True, help="show a progress bar"),
        dataset_name: DatasetNameOpt = None,
        shuffle_choices: ShuffleOpt = None,
    ) -> None:
        """Train an adapter and write it (PEFT format + tad_manifest.json) to --out."""
        from tad_core.assets import AssetError
        from tad_core.datasets import DatasetValidationError
        from tad_core.models import ModelLoadError
        from tad_core.train import TrainConfig, train_adapter

        try:
            cfg = TrainConfig(out=out, base=base, dataset=dataset, split=split, method=method,  # type: ignore[arg-type]
                              steps=steps, train_size=train_size, seed=seed, lr=lr, batch_size=batch_size,
                              max_length=max_length, threads=threads, format=fmt, loss=loss,  # type: ignore[arg-type]
                              datasets=tuple(d.strip() for d in (datasets or "").split(",") if d.strip()),
                              dataset_name=dataset_name, shuffle_choices=shuffle_choices)
            manifest = train_adapter(cfg, progress=progress)
        except (ValueError, ModelLoadError, AssetError, DatasetValidationError) as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USAGE) from None  # bad input: the same exit code as tad run / tad data validate
        typer.echo(f"{cfg.method} adapter: {cfg.out}  final loss {manifest['final_loss']:.4f}  "
                   f"mean last 10 {manifest['mean_loss_last_10']:.4f}  {manifest['elapsed_s']:.0f} s")
