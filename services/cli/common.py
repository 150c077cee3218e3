"""What the CLI command modules share: exit codes, the common options, user-error handling (one message, exit
2, no traceback), settings and schema checks, request building, and the leaderboard / progress output."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from services.refs import MAX_ID

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
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="registered dataset NAME, FILE.jsonl, FILE.json "
                                         "(an array), NAME=FILE, NAME=train.jsonl,val.jsonl (one file per split) "
                                         "or lmeval:TASK.yaml (a local lm-evaluation-harness task)")]
DatasetNameOpt = Annotated[Optional[str], typer.Option("--dataset-name", help="label a dataset file (default: its "
                                                       "file name without extension)")]
ShuffleOpt = Annotated[Optional[int], typer.Option("--shuffle-choices", metavar="SEED", help="show every MC "
                                                   "sample's choices in a seeded order (sets whose gold sits at a "
                                                   "fixed position); the dataset is then labelled NAME+shuffleSEED")]
SplitOpt = Annotated[str, typer.Option("--split", help="dataset split")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="first N samples only")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="samples per forward batch")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="generation length (generation tasks)")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy")]
FloorOpt = Annotated[Optional[float], typer.Option("--mc-floor", help="MC scoring: log-prob charged for a token a "
                                                   "strategy excludes (e.g. -1000) instead of -inf for the choice")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1)]
JobArg = Annotated[int, typer.Argument(min=1, max=MAX_ID, help="job id")]
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


def api_client(server: str, api_token: str | None) -> Any:
    """The API client of `--server` mode (services.cli.remote)."""
    from services.cli import remote

    return remote.ApiClient(server, api_token)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def fail_listing(what: str, errors: Iterable[str]) -> NoReturn:
    """Exit 2 after `error: WHAT, nothing was stored:` and one indented line per problem."""
    typer.secho(f"error: {what}, nothing was stored:", err=True, fg=typer.colors.RED)
    for line in errors:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(EXIT_USAGE) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one message and exit code 2 (1 for an out-of-date schema)."""
    from services.db.schema import SchemaOutOfDate
    from services.db.store import NotFound
    from services.security import SecurityError
    from services.submit_request import SubmissionError

    try:
        yield
    except SubmissionError as e:
        fail_listing("submission rejected", e.errors)
    except (SecurityError, NotFound) as e:
        fail(str(e))
    except SchemaOutOfDate as e:
        fail(str(e), 1)


def first_line(exc: BaseException) -> str:
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

    settings = cli_settings()
    if isinstance(exc, (OperationalError, InterfaceError)):
        return (f"database unavailable at {safe(settings.database_url)}: {first_line(exc)} "
                "(check TAD_DATABASE_URL and that the server runs)")
    try:
        import redis.exceptions as redis_errors

        broker_errors: tuple[type[BaseException], ...] = (BrokerError, redis_errors.ConnectionError)
    except ImportError:  # pragma: no cover - redis is a dependency of the team mode only
        broker_errors = (BrokerError,)
    if isinstance(exc, broker_errors):
        return (f"broker unavailable at {safe(settings.broker_url)}: {first_line(exc)} "
                "(check TAD_BROKER_URL and that Redis runs)")
    return None


def cli_settings():  # noqa: ANN202
    from services.settings import get_settings

    return get_settings()


def check_schema(settings: Any, migrate_embedded: bool = False) -> None:
    from services.db.schema import ensure_schema_current, upgrade_if_embedded
    from services.db.session import get_engine

    if migrate_embedded:
        upgrade_if_embedded(settings.database_url)
    ensure_schema_current(get_engine(settings))


def build_request(dataset: str, strategy: list[str], base: str, adapter: str | None, adapter_name: str | None,
             finetuned: str | None, split: str, limit: int | None, batch_size: int, max_new_tokens: int,
             temperature: float, seed: int, shard_size: int | None, token: str | None, user: str,
             mc_floor: float | None = None, fmt: str = "mc-loglik", stop: list[str] | None = None,
             extract: str | None = None, num_beams: int = 1, dtype: str | None = None) -> Any:
    from services.submit_request import SubmitRequest

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


def print_leaderboard(rows: list[Any], title: str) -> None:
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


def json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def job_payload(settings: Any, job_id: int, with_samples: bool) -> dict[str, Any]:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        board = store.leaderboard(s, job_ids=[job_id])
        out: dict[str, Any] = {"job": asdict(job), "leaderboard": [asdict(r) for r in board]}
        if with_samples:
            from services.export import export_row, gold_of

            golds = [gold_of(x) for x in store.load_samples(s, job.dataset_id, 0, job.n_samples)]
            out["samples"] = {r.key: [export_row(row, golds[row["sample_index"]]) for row in
                                      store.sample_rows(s, r.run_id)] for r in board}
    return out


def follow_job(job: Any, get: Callable[[], Any], interval: float) -> Any:
    """Poll `get()` every `interval` s with a progress bar until the job ends (DB and server mode alike)."""
    if job.finished:
        return job
    with progress_bar(job.n_samples, f"job {job.id}") as bar:
        while True:
            bar.n = job.samples_done
            bar.set_postfix_str(job.status)
            bar.refresh()
            if job.finished:
                return job
            time.sleep(interval)
            job = get()


def progress_bar(total: int, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)
