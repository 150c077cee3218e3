"""Entry point of the `tad` command: each command group lives in its own module and registers itself here."""
from __future__ import annotations

import sys
from typing import Any

import typer

from services.cli import common, core_cmd, data_cmd, jobs_cmd, regress_cmd, serve_cmd, train_cmd, users_cmd

class _Tad(typer.Typer):
    """The `tad` app: a database or broker that cannot be reached ends any command with one line and exit code
    3 (EXIT_UNAVAILABLE) instead of a driver traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as e:
            message = common.unavailable_message(e)
            if message is None:
                raise
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            sys.exit(common.EXIT_UNAVAILABLE)


app = _Tad(help="TaD-Eval: Task-aware Decoding evaluation service.", no_args_is_help=True,
           pretty_exceptions_enable=False, add_completion=False)
for module in (core_cmd, data_cmd, train_cmd, jobs_cmd, regress_cmd, users_cmd, serve_cmd):
    module.register(app)

if __name__ == "__main__":
    app()
