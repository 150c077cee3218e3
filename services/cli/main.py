"""Entry point of the `tad` command: each command group lives in its own module and registers itself here."""
from __future__ import annotations

import typer

from services.cli import core_cmd, data_cmd, jobs_cmd, regress_cmd, train_cmd

app = typer.Typer(help="TaD-Eval: Task-aware Decoding evaluation service.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
for module in (core_cmd, data_cmd, train_cmd, jobs_cmd, regress_cmd):
    module.register(app)

if __name__ == "__main__":
    app()
