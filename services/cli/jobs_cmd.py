"""Service commands: submit / run / jobs / status / cancel / requeue / results / worker / db / dashboard.

User errors (bad strategy, bad dataset line, path outside the model roots, unknown job, wrong token) print one
clear message and exit with code 2, without a traceback; an out-of-date database says to run `tad db upgrade`
(exit 1); a database or broker that cannot be reached is one line and exit 3 (services.cli.main). Every
user-supplied string printed in a Rich table or title is escaped (`cell`), so `mallory[/]` prints as itself.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from services.refs import MAX_ID

from services.cli.common import (AdapterNameOpt, AdapterOpt, ApiTokenOpt, BaseOpt, BatchOpt, BeamsOpt, DatasetNameOpt,
                                 DtypeOpt, DatasetOpt, EXIT_UNAVAILABLE, JobArg, ExtractOpt, FinetunedOpt, FloorOpt, FormatOpt,
                                 LimitOpt, SeedOpt, ShuffleOpt, ServerOpt, ShardOpt, SplitOpt, StopOpt, StrategyOpt,
                                 TempOpt, TokenOpt, TokensOpt, UserOpt, first_line, api_client, build_request, cell,
                                 check_schema, cli_settings, fail, follow_job, job_payload, json_default,
                                 print_leaderboard, progress_bar, user_errors)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tad` app."""

    @app.command()
    def submit(dataset: DatasetOpt, strategy: StrategyOpt = ["ft"], base: BaseOpt = "smollm2-135m-instruct",
               adapter: AdapterOpt = None, adapter_name: AdapterNameOpt = None, finetuned: FinetunedOpt = None,
               split: SplitOpt = "val", limit: LimitOpt = None, batch_size: BatchOpt = 8,
               max_new_tokens: TokensOpt = 64, temperature: TempOpt = 0.0, seed: SeedOpt = 0, mc_floor: FloorOpt = None,
               shard_size: ShardOpt = None, token: TokenOpt = None, user: UserOpt = "", fmt: FormatOpt = "mc-loglik",
               stop: StopOpt = None, extract: ExtractOpt = None, num_beams: BeamsOpt = 1, server: ServerOpt = None,
               api_token: ApiTokenOpt = None, dataset_name: DatasetNameOpt = None, dtype: DtypeOpt = None,
               shuffle_choices: ShuffleOpt = None) -> None:
        """Validate and queue an evaluation job for the workers; prints the job id (with --server: through the
        API, a local .jsonl dataset uploaded)."""
        from services.user_datasets import resolve_dataset

        with user_errors():
            dataset = resolve_dataset(dataset, split, dataset_name, shuffle_choices)
        if server:
            from services.cli import remote

            remote.submit(api_client(server, api_token),
                          build_request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit, batch_size,
                                   max_new_tokens, temperature, seed, shard_size, token, user, mc_floor, fmt, stop,
                                   extract, num_beams, dtype))
            return
        from services.planning import plan_job
        from services.queueing import QueueUnavailable, enqueue_or_fail

        settings = cli_settings()
        with user_errors():
            check_schema(settings)
            plan = plan_job(build_request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit,
                                     batch_size, max_new_tokens, temperature, seed, shard_size, token, user, mc_floor,
                                     fmt, stop, extract, num_beams, dtype), settings)
        try:
            sent = enqueue_or_fail(plan.job.id, settings)
        except QueueUnavailable as e:
            fail(f"job {plan.job.id} stored but the broker is unreachable ({first_line(e.cause)}); job marked "
                  "failed", EXIT_UNAVAILABLE)
        typer.echo(f"job {plan.job.id}: {plan.job.n_samples} samples x {len(plan.runs)} strategies, "
                   f"{sent} shards queued", err=True)
        typer.echo(plan.job.id)

    @app.command()
    def run(dataset: DatasetOpt, strategy: StrategyOpt = ["ft"], base: BaseOpt = "smollm2-135m-instruct",
            adapter: AdapterOpt = None, adapter_name: AdapterNameOpt = None, finetuned: FinetunedOpt = None,
            split: SplitOpt = "val", limit: LimitOpt = None, batch_size: BatchOpt = 8,
            max_new_tokens: TokensOpt = 64, temperature: TempOpt = 0.0, seed: SeedOpt = 0, mc_floor: FloorOpt = None,
            shard_size: ShardOpt = None, token: TokenOpt = None, user: UserOpt = "", fmt: FormatOpt = "mc-loglik",
            stop: StopOpt = None, extract: ExtractOpt = None, num_beams: BeamsOpt = 1, dtype: DtypeOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
            dataset_name: DatasetNameOpt = None, shuffle_choices: ShuffleOpt = None) -> None:
        """Run a job in this process (embedded mode: the DB from TAD_DATABASE_URL, default SQLite in the cache)."""
        from services.planning import plan_job
        from services.user_datasets import resolve_dataset

        settings = cli_settings()
        with user_errors():
            dataset = resolve_dataset(dataset, split, dataset_name, shuffle_choices)
            check_schema(settings, migrate_embedded=True)
            plan = plan_job(build_request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit,
                                     batch_size, max_new_tokens, temperature, seed, shard_size, token, user, mc_floor,
                                     fmt, stop, extract, num_beams, dtype), settings)
        _run_here(settings, plan.job.id, plan.job.n_samples, 0, as_json)

    @app.command()
    def resume(job_id: JobArg,
               as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False) -> None:
        """Finish an interrupted job in this process (a `tad run` that was killed or stopped with Ctrl-C, or a
        queued job without workers): its queued shards and those left running by a process that is gone. The
        samples already stored are kept and none is stored twice; a shard a live process still runs is left
        to it."""
        from services.db import store
        from services.db.session import session_scope

        settings = cli_settings()
        with user_errors():
            check_schema(settings, migrate_embedded=True)
            with session_scope(settings) as s:
                job = store.get_job(s, job_id)
        if job.finished:
            typer.echo(f"job {job_id} is already {job.status}: nothing to resume", err=True)
        else:
            _run_here(settings, job_id, job.n_samples, job.samples_done, as_json)

    def _run_here(settings: Any, job_id: int, n_samples: int, done: int, as_json: bool) -> None:
        """Run a job's open shards in this process with a progress bar, then print its results; exit 1 unless it
        ends `done`, 130 on Ctrl-C (with the command that continues it)."""
        from tad_core.models import ModelLoadError

        from services.db import store
        from services.db.session import session_scope
        from services.shard_runner import run_job_embedded

        try:
            with progress_bar(n_samples, f"job {job_id}") as bar:
                bar.update(done)
                info = run_job_embedded(job_id, settings, progress=bar.update)
        except ModelLoadError as e:
            with session_scope(settings) as s:
                store.mark_job_failed(s, job_id, str(e))
            fail(str(e))
        except KeyboardInterrupt:
            typer.secho(f"interrupted: the samples stored so far are kept; `tad resume {job_id}` continues the job",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130) from None
        if as_json:
            typer.echo(json.dumps(job_payload(settings, job_id, with_samples=True), default=json_default))
        else:
            _print_results(settings, job_id)
        if info.status not in ("done",):
            typer.secho(f"job {info.id} ended {info.status}: {info.error or ''}", err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(1)

    @app.command()
    def jobs(limit: Annotated[int, typer.Option(min=1, max=MAX_ID)] = 20,
             status: Annotated[Optional[str], typer.Option()] = None,
             as_json: Annotated[bool, typer.Option("--json")] = False, server: ServerOpt = None,
             api_token: ApiTokenOpt = None) -> None:
        """List recent jobs (with --server: "by" is the owner of the token that submitted it)."""
        from rich.console import Console
        from rich.table import Table

        from services.db.models import JOB_STATUSES

        if status is not None and status not in JOB_STATUSES:
            fail(f"--status {status!r}: expected one of {', '.join(JOB_STATUSES)}")

        if server:
            from services.cli import remote

            rows = remote.jobs(api_client(server, api_token), limit, status)
        else:
            from services.db import store
            from services.db.session import session_scope

            settings = cli_settings()
            with user_errors():
                check_schema(settings, migrate_embedded=True)
            with session_scope(settings) as s:
                rows = store.list_jobs(s, limit=limit, status=status)
        if as_json:
            typer.echo(json.dumps([asdict(j) for j in rows], default=json_default))
            return
        table = Table()
        for col in ("job", "status", "progress", "shards", "dataset", "model", "strategies", "by", "created"):
            table.add_column(col)
        for j in rows:
            model = j.spec.get("adapter_label") or j.spec.get("finetuned") or j.spec.get("base")
            table.add_row(str(j.id), j.status, f"{j.samples_done}/{j.n_samples}",
                          f"{j.shards_done}/{j.n_shards}" + (f" ({j.shards_failed} failed)" if j.shards_failed else ""),
                          cell(f"{j.spec.get('dataset')}:{j.spec.get('split')}"), cell(model),
                          str(len(j.spec.get("strategies", []))), cell(j.submitted_by),
                          j.created_at.strftime("%Y-%m-%d %H:%M"))
        Console(width=160).print(table)

    @app.command()
    def status(job_id: JobArg, watch: Annotated[bool, typer.Option("--watch", help="progress bar until it ends")] = False,
               interval: Annotated[float, typer.Option(min=0.1)] = 1.0, server: ServerOpt = None,
               api_token: ApiTokenOpt = None) -> None:
        """Show a job's status (with --watch: a live progress bar until the job ends)."""
        if server:
            from services.cli import remote

            client = api_client(server, api_token)
            job = remote.watch(client, job_id, interval) if watch else remote.get_job(client, job_id)
            _print_status(job)
            return
        from services.db import store
        from services.db.session import session_scope

        settings = cli_settings()

        def get() -> Any:
            with session_scope(settings) as s:
                return store.get_job(s, job_id)

        with user_errors():
            check_schema(settings, migrate_embedded=True)
            job = get()
        if watch:
            job = follow_job(job, get, interval)
        _print_status(job)

    @app.command()
    def cancel(job_id: JobArg, token: TokenOpt = None, server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """Cancel a job: queued shards stop now, running ones within seconds (needs the submit token when the
        deployment sets TAD_SUBMIT_TOKEN, like the dashboard's Cancel button: cancelling is as privileged as
        submitting; with --server: the job's owner or an admin token)."""
        if server:
            from services.cli import remote

            job = remote.cancel(api_client(server, api_token), job_id)
        else:
            from services.db import store
            from services.db.session import session_scope
            from services.security import check_submit_token

            settings = cli_settings()
            with user_errors():
                check_submit_token(settings, token)
                check_schema(settings, migrate_embedded=True)
                with session_scope(settings) as s:
                    job = store.request_cancel(s, job_id)
        typer.echo(f"job {job.id}: {job.status}" + (" (running shards stop within seconds)"
                                                     if job.status == "running" else ""))

    @app.command()
    def requeue(job_id: JobArg, server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """Send a job's unfinished shards to the broker again (after the broker lost its messages): queued shards
        and running ones whose worker stopped beating; shards of live workers are left to them."""
        if server:
            from services.cli import remote

            sent = remote.requeue(api_client(server, api_token), job_id)
            typer.echo(f"job {job_id}: {sent} shard(s) sent to the queue by {server}")
            return
        from services.db.store import NotFound
        from services.queueing import requeue_job

        settings = cli_settings()
        with user_errors():
            check_schema(settings)
            try:
                sent = requeue_job(job_id, settings)
            except NotFound:
                raise  # -> "job N does not exist", exit 2
            except Exception as e:  # noqa: BLE001 - broker unreachable: say so, change nothing
                fail(f"could not reach the broker ({first_line(e)}); nothing was requeued", EXIT_UNAVAILABLE)
        typer.echo(f"job {job_id}: {sent} shard(s) sent to the queue {settings.queue!r}")

    @app.command()
    def results(job_id: JobArg, as_csv: Annotated[bool, typer.Option("--csv", help="per-sample rows as CSV")] = False,
                as_json: Annotated[bool, typer.Option("--json", help="leaderboard + per-sample rows as JSON")] = False,
                output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to a file")] = None,
                lmeval: Annotated[Optional[Path], typer.Option("--lmeval", help="write lm-evaluation-harness output "
                                                               "(results_*.json, samples_*.jsonl) per strategy "
                                                               "under this directory")] = None,
                mlflow: Annotated[Optional[str], typer.Option("--mlflow", metavar="URI", help="log one MLflow run "
                                                              "per strategy to this tracking URI (needs "
                                                              "tad-eval\\[mlflow])")] = None,
                mlflow_experiment: Annotated[str, typer.Option("--mlflow-experiment", help="MLflow experiment "
                                                               "name (created if missing)")] = "tad-eval",
                server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """A job's leaderboard (table), or its per-sample results exported as CSV / JSON / lm-eval output, or
        logged to an MLflow tracking server."""
        if sum(map(bool, (as_csv, as_json, lmeval, mlflow))) > 1:
            fail("pass one of --csv, --json, --lmeval, --mlflow")
        if server:
            from services.cli import remote

            if mlflow:
                fail("--mlflow needs the database (it is not available with --server); use --json or --csv")
            remote.results(api_client(server, api_token), job_id, as_csv, as_json, output, lmeval)
            return
        settings = cli_settings()
        with user_errors():
            check_schema(settings, migrate_embedded=True)
            if mlflow:
                _export_mlflow(settings, job_id, mlflow, mlflow_experiment)
                return
            if lmeval is not None:
                _export_lmeval(settings, job_id, lmeval)
                return
            if not (as_csv or as_json):
                _print_results(settings, job_id)
                return
            payload = job_payload(settings, job_id, with_samples=True)
        try:
            out = open(output, "w", newline="") if output else sys.stdout
        except OSError as e:
            fail(f"--output {output}: {e.strerror or e}")
        try:
            if as_json:
                out.write(json.dumps(payload, default=json_default) + "\n")
            else:
                from services.export import SAMPLE_CSV_COLUMNS, sample_csv_cells

                writer = csv.writer(out)
                writer.writerow(SAMPLE_CSV_COLUMNS)
                for key, rows in payload["samples"].items():
                    for r in rows:
                        writer.writerow(sample_csv_cells(key, r))
        finally:
            if output:
                out.close()

    @app.command()
    def worker(concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="worker processes "
                                                        "(one model copy each)")] = 1,
               queue: Annotated[Optional[str], typer.Option(help="queue (default TAD_QUEUE)")] = None,
               name: Annotated[Optional[str], typer.Option(help="node name (default tad-<pid>@<host>)")] = None,
               loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
        """Start a Celery worker (prefork pool) that runs shards from the broker."""
        import os

        settings = cli_settings()
        with user_errors():
            check_schema(settings)
        from services.tasks import app as celery_app

        celery_app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(concurrency),
                                "-Q", queue or settings.queue, "--loglevel", loglevel,
                                "-n", name or f"tad-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])

    db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("upgrade")
    def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
        """Migrate the database (TAD_DATABASE_URL) to the newest schema."""
        from services.db.schema import current_revision, upgrade
        from services.db.session import make_engine

        settings = cli_settings()
        upgrade(settings.database_url, revision)
        engine = make_engine(settings.database_url)
        typer.echo(f"database at revision {current_revision(engine)}")
        engine.dispose()

    @db_app.command("current")
    def db_current() -> None:
        """Print the database's revision and the revision this code expects."""
        from services.db.schema import current_revision, head_revision
        from services.db.session import make_engine

        settings = cli_settings()
        engine = make_engine(settings.database_url)
        have, want = current_revision(engine), head_revision()
        engine.dispose()
        typer.echo(f"database: {have or '<empty>'}\ncode expects: {want}")
        if have != want:
            typer.echo("run `tad db upgrade`")
            raise typer.Exit(1)

    @app.command()
    def dashboard(port: Annotated[int, typer.Option(min=1, max=65535)] = 8501,
                  address: Annotated[str, typer.Option()] = "127.0.0.1") -> None:
        """Start the Streamlit dashboard (reads the same database)."""
        app_path = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
        if not app_path.is_file():
            fail(f"dashboard app not found at {app_path}", 1)
        cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.headless", "true",
               "--server.port", str(port), "--server.address", address, "--browser.gatherUsageStats", "false"]
        raise typer.Exit(subprocess.call(cmd))


def _print_status(job: Any) -> None:
    typer.echo(f"job {job.id}: {job.status}, {job.samples_done}/{job.n_samples} samples, shards "
               f"{job.shards_done}/{job.n_shards} done, {job.shards_failed} failed")
    if job.error:
        typer.echo(f"error: {job.error}")


def _export_lmeval(settings: Any, job_id: int, out_dir: Path) -> None:
    from services.lmeval_export import ExportError, export_job

    try:
        runs = export_job(settings, job_id, out_dir)
    except ExportError as e:
        fail(str(e))
    except OSError as e:
        fail(f"--lmeval {out_dir}: {e.strerror or e}")
    for run in runs:
        typer.echo(f"{run.key}: {run.results} {run.samples}")


def _export_mlflow(settings: Any, job_id: int, uri: str, experiment: str) -> None:
    from services.mlflow_export import MlflowExportError, export_job_mlflow

    try:
        logged = export_job_mlflow(settings, job_id, uri, experiment)
    except MlflowExportError as e:
        fail(str(e))
    for run in logged:
        typer.echo(f"{run.key}: MLflow run {run.mlflow_run_id}{' (already logged)' if run.skipped else ''}")


def _print_results(settings: Any, job_id: int) -> None:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        rows = store.leaderboard(s, job_ids=[job_id])
        base = store.get_base_model(s, job.base_model_id)
    model = job.spec.get("adapter_label") or job.spec.get("finetuned") or job.spec.get("base")
    print_leaderboard(rows, f"job {job.id} ({job.status}): {cell(model)} on {cell(job.spec.get('dataset'))}:"
                             f"{cell(job.spec.get('split'))}, {job.samples_done}/{job.n_samples} samples")
    if base.licence:
        typer.echo(f"base model {base.name} is used under its licence: {base.licence}")

