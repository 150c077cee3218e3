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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3  # the database or the broker cannot be reached


def cell(value: object) -> str:
    """`value` as Rich renders it literally: user-supplied text (names, datasets, errors) may contain `[...]`,
    which Rich would otherwise parse as markup (and crash on, e.g. `mallory[/]`)."""
    from rich.markup import escape

    return escape(str(value))

StrategyOpt = Annotated[list[str], typer.Option("--strategy", "-s", help="strategy spec, repeatable: ft, base, "
                                                "tad:alpha=0.5,1,2 (comma lists sweep), contrastive:beta=0.1")]
BaseOpt = Annotated[str, typer.Option("--base", help="registered base model name, model directory or .gguf")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="PEFT adapter DIR, or NAME:VERSION / "
                                                   "NAME:latest of a registered adapter")]
AdapterNameOpt = Annotated[Optional[str], typer.Option("--adapter-name", help="register a new adapter DIR under "
                                                       "this name (default: the directory name)")]
FinetunedOpt = Annotated[Optional[str], typer.Option("--finetuned", help="fully fine-tuned model DIR")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="registered dataset NAME, FILE.jsonl or "
                                         "lmeval:TASK.yaml (a local lm-evaluation-harness task)")]
SplitOpt = Annotated[str, typer.Option("--split", help="dataset split")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="first N samples only")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="samples per forward batch")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="generation length (generation tasks)")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy")]
FloorOpt = Annotated[Optional[float], typer.Option("--mc-floor", help="MC scoring: log-prob charged for a token a "
                                                   "strategy excludes (e.g. -1000) instead of -inf for the choice")]
SeedOpt = Annotated[int, typer.Option("--seed")]
FormatOpt = Annotated[str, typer.Option("--format", help="prompt format: mc-loglik (default), llm-adapters, chat, "
                                        "k-shot[:k=5,seed=0] (tad formats lists them)")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="generation: stop sequence, repeatable "
                                                      "(escapes such as \\n are read)")]
ExtractOpt = Annotated[Optional[str], typer.Option("--extract", help="generation: extraction mode for every sample: "
                                                   "first-match, first-line, last-number, choice-label")]
BeamsOpt = Annotated[int, typer.Option("--num-beams", min=1, help="generation: beam search width (1 = greedy)")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="dtype the models are loaded in: auto (bfloat16 on "
                                                 "a CUDA device that supports it, float32 on the CPU), float32, "
                                                 "bfloat16, float16 (default: TAD_DTYPE, else auto); part of every "
                                                 "run's identity")]
ShardOpt = Annotated[Optional[int], typer.Option("--shard-size", min=1, help="samples per shard (default "
                                                 "TAD_SHARD_SIZE)")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="TAD_TOKEN", help="submit token, when the "
                                                 "deployment sets TAD_SUBMIT_TOKEN")]
UserOpt = Annotated[str, typer.Option("--user", envvar="USER", help="recorded as the submitter")]
ServerOpt = Annotated[Optional[str], typer.Option("--server", envvar="TAD_SERVER_URL", help="TaD-Eval API URL "
                                                  "(tad serve): talk HTTP only, no database credentials needed")]
ApiTokenOpt = Annotated[Optional[str], typer.Option("--api-token", envvar="TAD_API_TOKEN", help="API token for "
                                                    "--server (tad tokens create NAME)")]


def _client(server: str, api_token: str | None) -> Any:
    """The API client of `--server` mode (services.cli.remote)."""
    from services.cli import remote

    return remote.ApiClient(server, api_token)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one message and exit code 2 (1 for an out-of-date schema)."""
    from services.db.schema import SchemaOutOfDate
    from services.db.store import NotFound
    from services.jobs import SubmissionError
    from services.security import SecurityError

    try:
        yield
    except SubmissionError as e:
        typer.secho("error: submission rejected, nothing was stored:", err=True, fg=typer.colors.RED)
        for line in e.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except (SecurityError, NotFound) as e:
        _fail(str(e))
    except SchemaOutOfDate as e:
        _fail(str(e), 1)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (driver errors carry multi-line SQL and hints)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def unavailable_message(exc: BaseException) -> str | None:
    """One line naming the unreachable service (database or broker, password hidden), or None when `exc` is not
    a connection failure."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import InterfaceError, OperationalError

    def safe(url: str) -> str:
        try:
            return make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - a URL we cannot parse is not shown at all
            return "<unparseable URL>"

    settings = _settings()
    if isinstance(exc, (OperationalError, InterfaceError)):
        return (f"database unavailable at {safe(settings.database_url)}: {_first_line(exc)} "
                "(check TAD_DATABASE_URL and that the server runs)")
    try:
        import redis.exceptions as redis_errors

        broker_errors: tuple[type[BaseException], ...] = (BrokerError, redis_errors.ConnectionError)
    except ImportError:  # pragma: no cover - redis is a dependency of the team mode only
        broker_errors = (BrokerError,)
    if isinstance(exc, broker_errors):
        return (f"broker unavailable at {safe(settings.broker_url)}: {_first_line(exc)} "
                "(check TAD_BROKER_URL and that Redis runs)")
    return None


def _settings():  # noqa: ANN202
    from services.settings import get_settings

    return get_settings()


def _check_schema(settings: Any, migrate_embedded: bool = False) -> None:
    from services.db.schema import ensure_schema_current, upgrade_if_embedded
    from services.db.session import get_engine

    if migrate_embedded:
        upgrade_if_embedded(settings.database_url)
    ensure_schema_current(get_engine(settings))


def _request(dataset: str, strategy: list[str], base: str, adapter: str | None, adapter_name: str | None,
             finetuned: str | None, split: str, limit: int | None, batch_size: int, max_new_tokens: int,
             temperature: float, seed: int, shard_size: int | None, token: str | None, user: str,
             mc_floor: float | None = None, fmt: str = "mc-loglik", stop: list[str] | None = None,
             extract: str | None = None, num_beams: int = 1, dtype: str | None = None) -> Any:
    from services.jobs import SubmitRequest

    optional = {"mc_floor": mc_floor, "extract": extract, "dtype": dtype}
    return SubmitRequest(dataset=dataset, strategies=list(strategy), base=base, adapter=adapter,
                         adapter_name=adapter_name, finetuned=finetuned, split=split, limit=limit,
                         config={"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                                 "temperature": temperature, "seed": seed, "format": fmt, "num_beams": num_beams,
                                 "stop": [unescape(x) for x in stop or []],
                                 **{k: v for k, v in optional.items() if v is not None}},
                         submitted_by=user or "", token=token, shard_size=shard_size)


def unescape(text: str) -> str:
    """A stop sequence as typed on a shell line: `\\n` means a newline, `\\t` a tab."""
    return text.encode("utf-8").decode("unicode_escape") if "\\" in text else text


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pm(v: float | None, se: float | None) -> str:
    return "-" if v is None else f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def _print_leaderboard(rows: list[Any], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("run", "strategy", "acc ± stderr", "acc_norm ± stderr", "n", "fixed/broken vs ft", "McNemar p vs ft",
                "Holm p", "ties", "unparsed"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    notes = []
    for r in rows:
        vs = f"{r.fixed}/{r.broken}" if r.fixed is not None else "-"
        key = r.label
        if "mu" in (r.info or {}):  # a calibrated svdecode: the mu it ran with, where it came from below the table
            key += f" mu={r.info['mu']:.4g}"
            notes.append(f"run {r.run_id}: mu={r.info['mu']:.6g} calibrated on {r.info.get('calibration_dataset', '?')}"
                         f" ({r.info.get('calibration_n_samples', '?')} samples, "
                         f"{r.info.get('calibration_n_tokens', '?')} tokens), calibration {r.info['calibration']}")
        table.add_row(str(r.run_id), escape(key), _pm(r.acc, r.acc_stderr), _pm(r.acc_norm, r.acc_norm_stderr),
                      str(r.n), vs, "-" if r.mcnemar_p is None else f"{r.mcnemar_p:.4g}",
                      "-" if r.mcnemar_p_holm is None else f"{r.mcnemar_p_holm:.4g}",
                      count_rate(r.metrics.get("ties"), r.n), count_rate(r.metrics.get("unparsed"), r.n))
    console = Console(width=170)
    console.print(table)
    if any(r.mcnemar_p_holm is not None for r in rows):
        console.print("Holm p: the McNemar p-values adjusted (Holm-Bonferroni) over this job's comparisons with ft")
    console.print("ties: MC samples where every choice was -inf (predicted by the tie-break to choice 0); "
                  "unparsed: generated outputs with no extractable answer (counted wrong)")
    for line in notes:
        console.print(escape(line))


def count_rate(count: float | None, n: int) -> str:
    """`12 (4.0%)`, or `-` where the measure does not apply (no MC / no generated samples)."""
    if count is None:
        return "-"
    return f"{int(count)} ({100 * count / n:.1f}%)" if n else str(int(count))


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _job_payload(settings: Any, job_id: int, with_samples: bool) -> dict[str, Any]:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        board = store.leaderboard(s, job_ids=[job_id])
        out: dict[str, Any] = {"job": asdict(job), "leaderboard": [asdict(r) for r in board]}
        if with_samples:
            out["samples"] = {r.key: store.sample_rows(s, r.run_id) for r in board}
    return out


def follow_job(job: Any, get: Callable[[], Any], interval: float) -> Any:
    """Poll `get()` every `interval` s with a progress bar until the job ends (DB and server mode alike)."""
    if job.finished:
        return job
    with _progress_bar(job.n_samples, f"job {job.id}") as bar:
        while True:
            bar.n = job.samples_done
            bar.set_postfix_str(job.status)
            bar.refresh()
            if job.finished:
                return job
            time.sleep(interval)
            job = get()


def _progress_bar(total: int, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tad` app."""

    @app.command()
    def submit(dataset: DatasetOpt, strategy: StrategyOpt = ["ft"], base: BaseOpt = "smollm2-135m-instruct",
               adapter: AdapterOpt = None, adapter_name: AdapterNameOpt = None, finetuned: FinetunedOpt = None,
               split: SplitOpt = "val", limit: LimitOpt = None, batch_size: BatchOpt = 8,
               max_new_tokens: TokensOpt = 64, temperature: TempOpt = 0.0, seed: SeedOpt = 0, mc_floor: FloorOpt = None,
               shard_size: ShardOpt = None, token: TokenOpt = None, user: UserOpt = "", fmt: FormatOpt = "mc-loglik",
               stop: StopOpt = None, extract: ExtractOpt = None, num_beams: BeamsOpt = 1, server: ServerOpt = None,
               api_token: ApiTokenOpt = None, dtype: DtypeOpt = None) -> None:
        """Validate and queue an evaluation job for the workers; prints the job id (with --server: through the
        API, a local .jsonl dataset uploaded)."""
        if server:
            from services.cli import remote

            remote.submit(_client(server, api_token),
                          _request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit, batch_size,
                                   max_new_tokens, temperature, seed, shard_size, token, user, mc_floor, fmt, stop,
                                   extract, num_beams, dtype))
            return
        from services.jobs import QueueUnavailable, enqueue_or_fail, plan_job

        settings = _settings()
        with _user_errors():
            _check_schema(settings)
            plan = plan_job(_request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit,
                                     batch_size, max_new_tokens, temperature, seed, shard_size, token, user, mc_floor,
                                     fmt, stop, extract, num_beams, dtype), settings)
        try:
            sent = enqueue_or_fail(plan.job.id, settings)
        except QueueUnavailable as e:
            _fail(f"job {plan.job.id} stored but the broker is unreachable ({_first_line(e.cause)}); job marked "
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
            as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False) -> None:
        """Run a job in this process (embedded mode: the DB from TAD_DATABASE_URL, default SQLite in the cache)."""
        from tad_core.models import ModelLoadError

        from services.jobs import plan_job, run_job_embedded

        settings = _settings()
        with _user_errors():
            _check_schema(settings, migrate_embedded=True)
            plan = plan_job(_request(dataset, strategy, base, adapter, adapter_name, finetuned, split, limit,
                                     batch_size, max_new_tokens, temperature, seed, shard_size, token, user, mc_floor,
                                     fmt, stop, extract, num_beams, dtype), settings)
        try:
            with _progress_bar(plan.job.n_samples, f"job {plan.job.id}") as bar:
                info = run_job_embedded(plan.job.id, settings, progress=bar.update)
        except ModelLoadError as e:
            from services.db import store
            from services.db.session import session_scope

            with session_scope(settings) as s:
                store.mark_job_failed(s, plan.job.id, str(e))
            _fail(str(e))
        if as_json:
            typer.echo(json.dumps(_job_payload(settings, plan.job.id, with_samples=True), default=_json_default))
        else:
            _print_results(settings, plan.job.id)
        if info.status not in ("done",):
            typer.secho(f"job {info.id} ended {info.status}: {info.error or ''}", err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(1)

    @app.command()
    def jobs(limit: Annotated[int, typer.Option(min=1)] = 20, status: Annotated[Optional[str], typer.Option()] = None,
             as_json: Annotated[bool, typer.Option("--json")] = False, server: ServerOpt = None,
             api_token: ApiTokenOpt = None) -> None:
        """List recent jobs (with --server: "by" is the owner of the token that submitted it)."""
        from rich.console import Console
        from rich.table import Table

        if server:
            from services.cli import remote

            rows = remote.jobs(_client(server, api_token), limit, status)
        else:
            from services.db import store
            from services.db.session import session_scope

            settings = _settings()
            with _user_errors():
                _check_schema(settings, migrate_embedded=True)
            with session_scope(settings) as s:
                rows = store.list_jobs(s, limit=limit, status=status)
        if as_json:
            typer.echo(json.dumps([asdict(j) for j in rows], default=_json_default))
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
    def status(job_id: int, watch: Annotated[bool, typer.Option("--watch", help="progress bar until it ends")] = False,
               interval: Annotated[float, typer.Option(min=0.1)] = 1.0, server: ServerOpt = None,
               api_token: ApiTokenOpt = None) -> None:
        """Show a job's status (with --watch: a live progress bar until the job ends)."""
        if server:
            from services.cli import remote

            client = _client(server, api_token)
            job = remote.watch(client, job_id, interval) if watch else remote.get_job(client, job_id)
            _print_status(job)
            return
        from services.db import store
        from services.db.session import session_scope

        settings = _settings()

        def get() -> Any:
            with session_scope(settings) as s:
                return store.get_job(s, job_id)

        with _user_errors():
            _check_schema(settings, migrate_embedded=True)
            job = get()
        if watch:
            job = follow_job(job, get, interval)
        _print_status(job)

    @app.command()
    def cancel(job_id: int, token: TokenOpt = None, server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """Cancel a job: queued shards stop now, running ones within seconds (needs the submit token when the
        deployment sets TAD_SUBMIT_TOKEN, like the dashboard's Cancel button: cancelling is as privileged as
        submitting; with --server: the job's owner or an admin token)."""
        if server:
            from services.cli import remote

            job = remote.cancel(_client(server, api_token), job_id)
        else:
            from services.db import store
            from services.db.session import session_scope
            from services.security import check_submit_token

            settings = _settings()
            with _user_errors():
                check_submit_token(settings, token)
                _check_schema(settings, migrate_embedded=True)
                with session_scope(settings) as s:
                    job = store.request_cancel(s, job_id)
        typer.echo(f"job {job.id}: {job.status}" + (" (running shards stop within seconds)"
                                                     if job.status == "running" else ""))

    @app.command()
    def requeue(job_id: int, server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """Send a job's unfinished shards to the broker again (after the broker lost its messages): queued shards
        and running ones whose worker stopped beating; shards of live workers are left to them."""
        if server:
            from services.cli import remote

            sent = remote.requeue(_client(server, api_token), job_id)
            typer.echo(f"job {job_id}: {sent} shard(s) sent to the queue by {server}")
            return
        from services.db.store import NotFound
        from services.jobs import requeue_job

        settings = _settings()
        with _user_errors():
            _check_schema(settings)
            try:
                sent = requeue_job(job_id, settings)
            except NotFound:
                raise  # -> "job N does not exist", exit 2
            except Exception as e:  # noqa: BLE001 - broker unreachable: say so, change nothing
                _fail(f"could not reach the broker ({_first_line(e)}); nothing was requeued", EXIT_UNAVAILABLE)
        typer.echo(f"job {job_id}: {sent} shard(s) sent to the queue {settings.queue!r}")

    @app.command()
    def results(job_id: int, as_csv: Annotated[bool, typer.Option("--csv", help="per-sample rows as CSV")] = False,
                as_json: Annotated[bool, typer.Option("--json", help="leaderboard + per-sample rows as JSON")] = False,
                output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to a file")] = None,
                lmeval: Annotated[Optional[Path], typer.Option("--lmeval", help="write lm-evaluation-harness output "
                                                               "(results_*.json, samples_*.jsonl) per strategy "
                                                               "under this directory")] = None,
                server: ServerOpt = None, api_token: ApiTokenOpt = None) -> None:
        """A job's leaderboard (table), or its per-sample results exported as CSV / JSON / lm-eval output."""
        if server:
            from services.cli import remote

            if sum(map(bool, (as_csv, as_json, lmeval))) > 1:
                _fail("pass one of --csv, --json, --lmeval")
            remote.results(_client(server, api_token), job_id, as_csv, as_json, output, lmeval)
            return
        settings = _settings()
        with _user_errors():
            _check_schema(settings, migrate_embedded=True)
            if sum(map(bool, (as_csv, as_json, lmeval))) > 1:
                _fail("pass one of --csv, --json, --lmeval")
            if lmeval is not None:
                _export_lmeval(settings, job_id, lmeval)
                return
            if not (as_csv or as_json):
                _print_results(settings, job_id)
                return
            payload = _job_payload(settings, job_id, with_samples=True)
        out = open(output, "w", newline="") if output else sys.stdout
        try:
            if as_json:
                out.write(json.dumps(payload, default=_json_default) + "\n")
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

        settings = _settings()
        with _user_errors():
            _check_schema(settings)
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

        settings = _settings()
        upgrade(settings.database_url, revision)
        engine = make_engine(settings.database_url)
        typer.echo(f"database at revision {current_revision(engine)}")
        engine.dispose()

    @db_app.command("current")
    def db_current() -> None:
        """Print the database's revision and the revision this code expects."""
        from services.db.schema import current_revision, head_revision
        from services.db.session import make_engine

        settings = _settings()
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
            _fail(f"dashboard app not found at {app_path}", 1)
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
        _fail(str(e))
    for run in runs:
        typer.echo(f"{run.key}: {run.results} {run.samples}")


def _print_results(settings: Any, job_id: int) -> None:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        rows = store.leaderboard(s, job_ids=[job_id])
        base = store.get_base_model(s, job.base_model_id)
    model = job.spec.get("adapter_label") or job.spec.get("finetuned") or job.spec.get("base")
    _print_leaderboard(rows, f"job {job.id} ({job.status}): {cell(model)} on {cell(job.spec.get('dataset'))}:"
                             f"{cell(job.spec.get('split'))}, {job.samples_done}/{job.n_samples} samples")
    if base.licence:
        typer.echo(f"base model {base.name} is used under its licence: {base.licence}")

