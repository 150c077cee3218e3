"""Job planning and the shard function: the code shared by `tad submit`, `tad run` and the Celery workers.

- `plan_job` validates a whole request (strategies, parameters, paths, adapter, dataset) BEFORE storing anything,
  then registers the dataset / adapter if new (by content hash / weight hash), and creates the job, its runs (one
  per strategy spec) and its shards.
- `run_shard(job_id, start, stop)` is THE unit of work. The Celery task and embedded mode both call it: it claims
  the shard (attempt counted in the DB), loads the model pair through a per-process cache, reads the samples from
  the DB, evaluates batch by batch and upserts each batch's rows at once (results stream), stops at a batch
  boundary when the job is cancelled, then marks the shard done, refreshes the run aggregates and finishes the
  job when it was the last shard.

A shard survives its samples: each sample is checked against the per-sample budgets (services.budgets) before
it is evaluated, a batch that raises is evaluated again sample by sample, and a sample that is over budget or
raises alone gets rows that record the error (`sample_results.error`) while the shard's other samples are stored
as usual. A running batch is interrupted within `TAD_INTERRUPT_CHECK_INTERVAL` seconds when the job is cancelled
or the attempt passes `TAD_SHARD_TIME_LIMIT` (services.interrupt); a later attempt resumes after the samples an
earlier one stored.

Test-only fault hooks (documented, gated): only when the process has `TAD_ENABLE_TEST_FAULTS=1`,
- a sample whose `metadata` has `"tad_test_raise": "<message>"` raises RuntimeError(message) when evaluated
  (submitted data alone can never trigger it; the tests use it for a poisoned sample);
- `"tad_test_fail_shard": "<message>"` makes the whole batch holding the sample raise before any evaluation (a
  shard that fails every attempt: the attempt cap);
- `"tad_test_sleep": <seconds>` sleeps that long (in short steps, like decoding steps) when the sample is evaluated;
- `TAD_TEST_BATCH_DELAY=<seconds>` sleeps that long before each batch, standing in for slower (GPU-sized)
  batches so the tests can interrupt a job mid-way deterministically.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from services import heartbeat
from services.db import aggregates, store
from services.db.session import session_scope
from services.security import SecurityError, check_submit_token, resolve_under_roots
from services.settings import Settings, get_settings

log = logging.getLogger(__name__)

CODE_VERSION = "2"  # 2: acc_norm divides by the choice without its delimiter (lm-eval). Bump when a change alters results, so reuse by run hash never mixes code versions


class SubmissionError(ValueError):
    """A submission is invalid; `errors` lists every problem found (nothing was stored)."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class ShardRetry(RuntimeError):
    """An attempt of a shard failed and the shard may be retried (the attempt cap is not reached)."""


@dataclass(frozen=True)
class SubmitRequest:
    """Everything `tad submit` / `tad run` accept, as data."""

    dataset: str
    strategies: Sequence[str] = ("ft",)
    base: str = "smollm2-135m-instruct"
    adapter: str | None = None  # adapter directory, or name:version / name of a registered adapter
    finetuned: str | None = None  # fully fine-tuned model directory
    adapter_name: str | None = None  # name to register a new adapter directory under (default: directory name)
    split: str = "val"
    limit: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields (batch_size, max_new_tokens, ...)
    submitted_by: str = ""
    token: str | None = None
    shard_size: int | None = None
    owner_id: int | None = None  # API user id (services.db.users) recorded as the job's owner


@dataclass(frozen=True)
class PlannedJob:
    job: store.JobInfo
    runs: list[store.RunInfo]
    shards: list[tuple[int, int]]
    dataset: store.DatasetInfo
    dataset_created: bool
    adapter: store.AdapterInfo | None
    adapter_created: bool


@dataclass(frozen=True)
class ShardOutcome:
    job_id: int
    start: int
    stop: int
    action: str  # ran | done | failed | cancelled | busy (what happened on this delivery)
    samples: int = 0
    job_status: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _ModelSide:
    base_name: str
    base_path: str
    base_fingerprint: str
    adapter_dir: Path | None = None
    adapter_ref: tuple[str, int | None] | None = None  # registered name:version
    adapter_method: str = ""
    adapter_sha256: str = ""
    adapter_manifest: dict[str, Any] = field(default_factory=dict)
    finetuned_dir: Path | None = None
    finetuned_fingerprint: str = ""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """Identity of a model directory without hashing gigabytes: config bytes + weight file names and sizes."""
    h = hashlib.sha256()
    for name in ("config.json", "tad_source.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _parse_adapter_ref(text: str) -> tuple[str, int | None] | None:
    """`name:version` or `name:latest` -> (name, version); None when `text` looks like a path."""
    if "/" in text or text.startswith((".", "~")) or Path(text).expanduser().exists():
        return None
    name, sep, ver = text.partition(":")
    if not sep:
        return None
    if ver == "latest":
        return name, None
    if not ver.isdigit():
        raise SubmissionError([f"--adapter {text!r}: version must be an integer or 'latest'"])
    return name, int(ver)


@dataclass(frozen=True)
class AdapterDir:
    """A validated PEFT adapter directory: where it is, its weights' sha256, PEFT method and `tad train` manifest."""

    path: Path
    sha256: str
    method: str
    manifest: dict[str, Any]


def inspect_adapter_dir(text: str, settings: Settings, errors: list[str]) -> AdapterDir | None:
    """Validate an adapter directory (inside the model roots, PEFT config, safetensors weights) without loading it;
    problems are appended to `errors` (None returned)."""
    try:
        adir = resolve_under_roots(text, settings, "adapter")
    except SecurityError as e:
        errors.append(str(e))
        return None
    if not (adir / "adapter_config.json").is_file():
        errors.append(f"adapter {text!r}: not a PEFT adapter directory (no adapter_config.json)")
        return None
    weights = adir / "adapter_model.safetensors"
    if not weights.is_file():
        if (adir / "adapter_model.bin").is_file() and not settings.allow_pickle:
            errors.append(f"adapter {text!r} stores pickled weights (adapter_model.bin); convert it to "
                          "safetensors (pickle can run code on load; TAD_ALLOW_PICKLE=1 overrides)")
            return None
        weights = adir / "adapter_model.bin"
        if not weights.is_file():
            errors.append(f"adapter {text!r} has no adapter_model.safetensors")
            return None
    try:
        cfg = json.loads((adir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        errors.append(f"adapter {text!r}: unreadable adapter_config.json ({e})")
        return None
    manifest: dict[str, Any] = {}
    for name in ("tad_manifest.json", "manifest.json"):
        if (adir / name).is_file():
            try:
                manifest = json.loads((adir / name).read_text())
            except ValueError:
                manifest = {}
            break
    return AdapterDir(adir, _sha256_file(weights), str(cfg.get("peft_type", "unknown")).lower(), manifest)


def resolve_base(base: str, settings: Settings, errors: list[str]) -> tuple[str, str] | None:
    """(path, fingerprint) of a base model: a registered name (fingerprint of its pinned source) or a model
    directory inside the model roots (fingerprint of its config and weight files); problems go to `errors`."""
    from tad_core.models import KNOWN_MODELS

    try:
        if base in KNOWN_MODELS:
            return base, hashlib.sha256(KNOWN_MODELS[base].requirement.encode()).hexdigest()
        path = resolve_under_roots(base, settings, "base model")
    except SecurityError as e:
        errors.append(str(e))
        return None
    if not (path / "config.json").is_file():
        errors.append(f"base model {base!r}: not a registered name ({', '.join(KNOWN_MODELS)}) "
                      "nor a model directory with config.json")
        return None
    return str(path), _dir_fingerprint(path)


def local_base_dir(base: str, base_path: str) -> Path | None:
    """The base model's directory when it is already on this machine (a registered name fetched into the cache,
    or a model directory), else None: submission never downloads or converts a model."""
    from tad_core.models import KNOWN_MODELS
    from tad_core.paths import cache_subdir

    path = cache_subdir("models") / KNOWN_MODELS[base].name if base in KNOWN_MODELS else Path(base_path)
    return path if (path / "config.json").is_file() else None


def _adapter_fits_base(text: str, found: AdapterDir, base: str, base_path: str, settings: Settings,
                       errors: list[str]) -> bool:
    """Refuse at submission an adapter made for another base model, which would otherwise fail in the worker on
    every attempt of every shard: the base its `tad train` manifest names, and (load-free, when the base is on
    this machine) the shapes of its LoRA weights against the base's modules."""
    from tad_core.models import KNOWN_MODELS, ModelLoadError, check_adapter_fits

    trained_on = found.manifest.get("base")
    if isinstance(trained_on, str) and trained_on in KNOWN_MODELS and base in KNOWN_MODELS and trained_on != base:
        errors.append(f"adapter {text!r} was trained on base model {trained_on!r} (its manifest), not {base!r}; "
                      f"pass --base {trained_on}")
        return False
    local = local_base_dir(base, base_path)
    if local is None:
        return True  # the worker checks it when loading
    try:
        check_adapter_fits(str(local), found.path, allow_pickle=settings.allow_pickle)
    except ModelLoadError as e:
        errors.append(str(e).replace(repr(str(local)), repr(base)))
        return False
    except (OSError, ValueError) as e:
        errors.append(f"adapter {text!r}: cannot check it against base model {base!r} ({e})")
        return False
    return True


def _check_models(req: SubmitRequest, settings: Settings, errors: list[str]) -> _ModelSide | None:
    if req.adapter and req.finetuned:
        errors.append("pass either --adapter or --finetuned, not both")
        return None
    resolved = resolve_base(req.base, settings, errors)
    if resolved is None:
        return None
    side = _ModelSide(base_name=req.base, base_path=resolved[0], base_fingerprint=resolved[1])
    if req.adapter:
        ref = _parse_adapter_ref(req.adapter)
        if ref is not None:
            return _ModelSide(**{**side.__dict__, "adapter_ref": ref})
        found = inspect_adapter_dir(req.adapter, settings, errors)
        if found is None or not _adapter_fits_base(req.adapter, found, req.base, side.base_path, settings, errors):
            return None
        return _ModelSide(**{**side.__dict__, "adapter_dir": found.path, "adapter_sha256": found.sha256,
                             "adapter_method": found.method, "adapter_manifest": found.manifest})
    if req.finetuned:
        try:
            fdir = resolve_under_roots(req.finetuned, settings, "fine-tuned model")
        except SecurityError as e:
            errors.append(str(e))
            return None
        if not (fdir / "config.json").is_file():
            errors.append(f"fine-tuned model {req.finetuned!r}: not a model directory (no config.json)")
            return None
        return _ModelSide(**{**side.__dict__, "finetuned_dir": fdir, "finetuned_fingerprint": _dir_fingerprint(fdir)})
    return side


def _check_strategies(args: Sequence[str], errors: list[str]) -> list[Any]:
    from tad_core.strategies import parse_strategy_arg

    specs: dict[str, Any] = {}
    for arg in args:
        try:
            for spec in parse_strategy_arg(arg):
                specs.setdefault(spec.key, spec)
        except ValueError as e:
            errors.append(f"--strategy {arg!r}: {e}")
    if not args:
        errors.append("give at least one --strategy")
    if specs and "ft" not in {s.name for s in specs.values()}:
        # every other strategy is compared with the fine-tuned model (fixed/broken, McNemar): always include it
        (ft,) = parse_strategy_arg("ft")
        specs = {ft.key: ft, **specs}
    return list(specs.values())


def _check_config(values: dict[str, Any], errors: list[str]) -> Any:
    from tad_core.evaluate import EvalConfig

    try:
        return EvalConfig(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as e:
        errors.append(f"generation config: {e}")
        return None


@dataclass(frozen=True)
class _DatasetData:
    name: str
    split: str
    content_hash: str
    task_type: str
    source: str
    samples: list[dict[str, Any]]


def _check_dataset(req: SubmitRequest, settings: Settings, errors: list[str]) -> _DatasetData | None:
    from tad_core.datasets import REGISTRY, DatasetLimits, DatasetValidationError, load_dataset, validate_jsonl

    if req.limit is not None and req.limit < 1:
        errors.append(f"--limit must be a positive integer, got {req.limit}")
        return None
    try:
        if req.dataset in REGISTRY or req.dataset.startswith("lmeval:"):  # lmeval:TASK.yaml: tad_core.lmeval
            ds = load_dataset(req.dataset, split=req.split)
            name, content_hash, task_type, source, samples = ds.name, ds.content_hash, ds.task_type, ds.source, ds.samples
            if len(samples) > settings.max_dataset_rows:
                errors.append(f"dataset {req.dataset!r} has {len(samples)} rows, over TAD_MAX_DATASET_ROWS="
                              f"{settings.max_dataset_rows}")
                return None
        else:
            path = Path(req.dataset).expanduser()
            if path.suffix != ".jsonl" or not path.is_file():
                errors.append(f"dataset {req.dataset!r}: not a registered dataset ({', '.join(REGISTRY)}) "
                              "nor an existing .jsonl file")
                return None
            limits = DatasetLimits(max_bytes=settings.max_dataset_bytes, max_rows=settings.max_dataset_rows,
                                   max_field_chars=settings.max_sample_chars)
            samples = validate_jsonl(path, limits)
            data = path.read_bytes()
            name, content_hash = path.stem, hashlib.sha256(data).hexdigest()
            kinds = {s.kind for s in samples}
            task_type = "mixed" if len(kinds) > 1 else ("gen" if kinds == {"gen"} else "mc")
            source = str(path.resolve())
    except DatasetValidationError as e:
        errors.extend(f"dataset {req.dataset!r}: {msg}" for msg in e.errors)
        return None
    except (ValueError, OSError) as e:
        errors.append(f"dataset {req.dataset!r}: {e}")
        return None
    return _DatasetData(name, req.split, content_hash, task_type, source, [s.to_dict() for s in samples])


@functools.lru_cache(maxsize=4)
def _submit_tokenizer(model_dir: str) -> Any:
    """The base model's tokenizer, loaded once per process (the dashboard submits many times)."""
    from tad_core.models import load_tokenizer

    return load_tokenizer(Path(model_dir))


def _line_numbers(source: str) -> list[int] | None:
    """Line number of each sample of a JSONL file (blank lines are skipped by the validator), or None."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    return [n for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if raw.strip()]


def _check_budgets(data: _DatasetData, config: Any, side: _ModelSide, settings: Settings,
                   errors: list[str], limit: int | None = None, max_errors: int = 50) -> None:
    """Refuse samples over the per-sample budgets (services.budgets) before anything is stored, naming line, id and
    field. Token budgets need the base model's tokenizer; a submitting machine without the base model checks the
    choice counts only (the worker checks everything again)."""
    from tad_core.samples import Sample

    from services.budgets import Budgets, generation_over_budget, over_budget, token_counter

    budgets = Budgets.from_settings(settings)
    if any(d.get("reference") is not None for d in data.samples):
        why = generation_over_budget(config.max_new_tokens, budgets)
        if why:
            errors.append(f"generation config: {why}")
    local = local_base_dir(side.base_name, side.base_path)
    count = None
    if local is not None:
        try:
            count = token_counter(_submit_tokenizer(str(local)))
        except Exception as e:  # noqa: BLE001 - an unreadable tokenizer: the worker will say more
            log.warning("no tokenizer for the submission's token budgets (%s); the worker checks them", e)
    lines = _line_numbers(data.source)
    found = 0
    for i, d in enumerate(data.samples[:limit]):
        why = over_budget(Sample.from_dict(d), budgets, count, config.delimiter)
        if why is None:
            continue
        where = f"line {lines[i]}" if lines is not None and i < len(lines) else f"sample {i}"
        errors.append(f"dataset {data.name!r}: {where} (id {d.get('id')!r}): {why}")
        found += 1
        if found >= max_errors:
            errors.append(f"stopped after {max_errors} samples over budget")
            return


def _check_format(fmt_key: str, data: _DatasetData, limit: int | None, errors: list[str]) -> None:
    """Every sample the job will evaluate must render in the prompt format (the first few problems listed)."""
    from tad_core.formats import FormatError, parse_format
    from tad_core.samples import Sample

    fmt = parse_format(fmt_key)
    bad: list[str] = []
    for i, d in enumerate(data.samples[:limit]):
        try:
            fmt.check(Sample.from_dict(d), data.name)
        except FormatError as e:
            bad.append(f"--format {fmt_key}: sample {i + 1} ({d.get('id')!r}): {e}")
    errors.extend(bad[:5] + ([f"--format {fmt_key}: {len(bad) - 5} more samples cannot be rendered"]
                             if len(bad) > 5 else []))


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` samples covering 0..n."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def run_hash(*, base_fingerprint: str, adapter_sha256: str, finetuned_fingerprint: str, content_hash: str,
             split: str, n_samples: int, spec_key: str, config: dict[str, Any]) -> str:
    """Identity of a run's results: identical requests (same models, data slice, strategy, config, code) reuse it."""
    ident = {"base": base_fingerprint, "adapter": adapter_sha256, "finetuned": finetuned_fingerprint,
             "dataset": content_hash, "split": split, "n": n_samples, "strategy": spec_key, "config": config,
             "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed every check, with what planning and reuse need; nothing is stored yet."""

    req: SubmitRequest
    specs: list[Any]
    config_json: dict[str, Any]
    side: _ModelSide
    data: _DatasetData
    n_samples: int
    shard_size: int

    def run_hashes(self, adapter_sha256: str) -> dict[str, str]:
        """Strategy key -> run hash, for the adapter whose weights have `adapter_sha256` ("" for none)."""
        return {sp.key: run_hash(base_fingerprint=self.side.base_fingerprint, adapter_sha256=adapter_sha256,
                                 finetuned_fingerprint=self.side.finetuned_fingerprint,
                                 content_hash=self.data.content_hash, split=self.data.split,
                                 n_samples=self.n_samples, spec_key=sp.key, config=self.config_json)
                for sp in self.specs}


def validate_request(req: SubmitRequest, settings: Settings | None = None) -> ValidatedRequest:
    """Check `req` completely (token, strategies, config, models, dataset) without storing anything.

    Raises SubmissionError (listing every problem) or SecurityError.
    """
    from services.model_dtype import resolve_config_dtype

    settings = settings or get_settings()
    check_submit_token(settings, req.token)
    errors: list[str] = []
    specs = _check_strategies(req.strategies, errors)
    config = _check_config(resolve_config_dtype(req.config, settings), errors)
    side = _check_models(req, settings, errors)
    data = _check_dataset(req, settings, errors) if not errors else None
    if data is not None and any(sp.name == "svdecode" and sp.params.get("mu") == "auto" for sp in specs):
        from tad_core.datasets import REGISTRY

        if req.dataset not in REGISTRY or "train" not in REGISTRY[req.dataset].splits:
            errors.append("svdecode with mu=auto calibrates on the train split of a registered dataset; "
                          f"{req.dataset!r} has none: give mu a number (e.g. --strategy svdecode:mu=1.0)")
    if data is not None and side is not None and config is not None:
        _check_budgets(data, config, side, settings, errors, limit=req.limit)
    if data is not None and config is not None:
        _check_format(config.format, data, req.limit, errors)
    size = req.shard_size or settings.shard_size
    if size < 1:
        errors.append(f"shard size must be positive, got {size}")
    if errors or data is None or side is None or config is None:
        raise SubmissionError(errors or ["invalid submission"])
    n = len(data.samples) if req.limit is None else min(req.limit, len(data.samples))
    return ValidatedRequest(req, specs, config.to_json(), side, data, n, size)


def plan_job(req: SubmitRequest, settings: Settings | None = None) -> PlannedJob:
    """Validate `req` completely, then store dataset/adapter (if new), the job, its runs and shards.

    Raises SubmissionError (listing every problem) or SecurityError before anything is written.
    """
    settings = settings or get_settings()
    return plan_validated(validate_request(req, settings), settings)


def plan_validated(v: ValidatedRequest, settings: Settings | None = None) -> PlannedJob:
    """Store a validated request: dataset/adapter (if new), the job, its runs and shards."""
    from tad_core.models import model_licence

    settings = settings or get_settings()
    req, specs, side, data, n = v.req, v.specs, v.side, v.data, v.n_samples
    with session_scope(settings) as s:
        adapter: store.AdapterInfo | None = None
        adapter_created = False
        if side.adapter_ref is not None:
            adapter = store.find_adapter(s, *side.adapter_ref)
            if adapter is None:
                name, ver = side.adapter_ref
                raise SubmissionError([f"adapter {name}:{ver if ver is not None else 'latest'} is not registered"
                                       " (tad adapters list)"])
            if adapter.base_model != req.base:
                raise SubmissionError([f"adapter {adapter.label} belongs to base model {adapter.base_model!r}, "
                                       f"not {req.base!r}"])
            resolve_under_roots(adapter.path, settings, "adapter")
        base = store.get_or_create_base_model(s, req.base, side.base_path, side.base_fingerprint,
                                              model_licence(req.base, Path(side.base_path)))
        if side.adapter_dir is not None:
            adapter, adapter_created = store.register_adapter(
                s, name=req.adapter_name or side.adapter_dir.name, path=str(side.adapter_dir),
                method=side.adapter_method, sha256=side.adapter_sha256, base_model_id=base.id,
                manifest=side.adapter_manifest)
        dataset, dataset_created = store.register_dataset(
            s, name=data.name, split=data.split, content_hash=data.content_hash, task_type=data.task_type,
            source=data.source, samples=data.samples)
        hashes = v.run_hashes(adapter.sha256 if adapter else "")
        runs = [store.RunSpec(sp.name, dict(sp.params), sp.key, hashes[sp.key]) for sp in specs]
        spec = {
            "base": req.base,
            "adapter": adapter.path if adapter else None,
            "adapter_label": adapter.label if adapter else None,
            "finetuned": str(side.finetuned_dir) if side.finetuned_dir else None,
            "strategies": [sp.to_json() for sp in specs],
            "config": v.config_json,
            "dataset": data.name,
            "split": data.split,
            "limit": req.limit,
        }
        ranges = shard_ranges(n, v.shard_size)
        job = store.create_job(s, spec=spec, submitted_by=req.submitted_by, base_model_id=base.id,
                               adapter_id=adapter.id if adapter else None, dataset_id=dataset.id, n_samples=n,
                               runs=runs, shard_ranges=ranges, owner_id=req.owner_id)
        return PlannedJob(job, store.job_runs(s, job.id), ranges, dataset, dataset_created, adapter, adapter_created)


# ---------------------------------------------------------------------------------------------------------------
# The shard function


_pair_lock = threading.Lock()
_pair_cache: dict[tuple[Any, ...], Any] = {}


def get_pair(spec: dict[str, Any], settings: Settings) -> Any:
    """The job's model pair, loaded once per process (one pair kept: a worker serves one model at a time)."""
    from tad_core.models import load_pair

    from services.model_dtype import job_dtype

    dtype = job_dtype(spec)
    key = (spec["base"], spec.get("adapter"), spec.get("finetuned"), settings.device, dtype)
    with _pair_lock:
        pair = _pair_cache.get(key)
        if pair is None:
            _pair_cache.clear()
            pair = load_pair(spec["base"], adapter=spec.get("adapter"), finetuned=spec.get("finetuned"),
                             allow_pickle=settings.allow_pickle, device=settings.device, dtype=dtype)
            _pair_cache[key] = pair
        return pair


def clear_pair_cache() -> None:
    with _pair_lock:
        _pair_cache.clear()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _test_faults_enabled() -> bool:
    return os.environ.get("TAD_ENABLE_TEST_FAULTS") == "1"


def _test_meta(sample: Any, key: str) -> Any:
    return sample.metadata.get(key) if isinstance(sample.metadata, dict) else None


def _test_fault(samples: Sequence[Any]) -> None:
    """Batch-level test hooks (see the module docstring): the batch delay and a failing shard."""
    if not _test_faults_enabled():
        return
    delay = float(os.environ.get("TAD_TEST_BATCH_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    for sample in samples:
        if msg := _test_meta(sample, "tad_test_fail_shard"):
            raise RuntimeError(f"test fault on shard at sample {sample.id}: {msg}")


def _test_sample_fault(samples: Sequence[Any]) -> None:
    """Sample-level test hooks: a slow sample, a sample whose evaluation raises."""
    if not _test_faults_enabled():
        return
    for sample in samples:
        seconds = float(_test_meta(sample, "tad_test_sleep") or 0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
        if msg := _test_meta(sample, "tad_test_raise"):
            raise RuntimeError(f"test fault on sample {sample.id}: {msg}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # NaN / inf (an excluded choice) are not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def result_rows(results: Sequence[Any], first_index: int, run_ids: dict[str, int]) -> list[dict[str, Any]]:
    """Engine SampleResults (one per sample, in order from `first_index`) -> sample_results rows, one per run."""
    rows = []
    for offset, res in enumerate(results):
        for key, run_id in run_ids.items():
            o = res.outcomes.get(key)
            if o is None:
                continue
            kv_src = getattr(o, "kv", None) or res.kv
            kv = _json_safe(dict(kv_src)) if kv_src else None
            rows.append({
                "run_id": run_id, "sample_index": first_index + offset, "sample_id": str(res.sample_id),
                "output": o.output, "extracted": o.extracted, "pred": o.pred, "pred_norm": o.pred_norm,
                "scores": _json_safe(list(o.scores)) if o.scores is not None else None,
                "correct": o.correct, "correct_norm": o.correct_norm, "flip_rate": _json_safe(o.flip_rate),
                "vs_ft": o.vs_ft, "latency_s": float(o.latency_s or 0.0), "tokens": int(o.tokens or 0), "kv": kv,
                "tie": getattr(o, "tie", None),
            })
    return rows


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _holder_alive(session: Any, settings: Settings) -> Callable[[str, int], bool]:
    """A predicate for `store.claim_shard`: does the worker process named `host:pid` still run shard `shard_id`?
    Yes when it beat within `dead_after_s` naming that shard and, when it runs on this machine, its pid still
    exists (a child killed a second ago still has a fresh heartbeat, but its redelivered shard must run now, not
    after the heartbeat goes stale)."""
    fresh = {w.worker: w.shard_id for w in store.list_workers(session, seen_within_s=settings.dead_after_s)}
    host = socket.gethostname()

    def alive(name: str, shard_id: int) -> bool:
        if name not in fresh or fresh[name] != shard_id:
            return False
        where, _, pid = name.rpartition(":")
        return not (where == host and pid.isdigit() and not _pid_alive(int(pid)))

    return alive


def error_rows(index: int, sample_id: str, run_ids: dict[str, int], error: str) -> list[dict[str, Any]]:
    """The rows of a sample that has no result, one per run, recording why (over budget, evaluation raised)."""
    return [{"run_id": run_id, "sample_index": index, "sample_id": str(sample_id), "error": error[:2000],
             "latency_s": 0.0, "tokens": 0} for run_id in run_ids.values()]


def _transient(exc: BaseException) -> bool:
    """Database connection trouble (dropped backend, restart): not the shard's fault."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def run_shard(job_id: int, start: int, stop: int, settings: Settings | None = None, *,
              progress: Callable[[int], None] | None = None) -> ShardOutcome:
    """Evaluate samples [start, stop) of job `job_id` for all its runs, streaming rows to the DB per batch.

    Returns what happened. Raises ShardRetry when this attempt failed and the shard may be retried; a shard whose
    attempts reach `settings.max_redeliveries` is marked failed instead (the rest of the job goes on).
    `progress(n)` is called with the number of samples finished after each batch.
    """
    settings = settings or get_settings()
    me = worker_name()
    with session_scope(settings) as s:
        claim = store.claim_shard(s, job_id, start, me, settings.max_redeliveries,
                                  holder_alive=_holder_alive(s, settings))
        if claim.action == "busy":
            log.info("shard %s [%d,%d) is running in live process %s; this delivery is dropped", job_id, start,
                     stop, claim.shard.worker)
        elif claim.action == "run" and claim.shard.attempts > 1 and claim.shard.error:
            log.warning("shard %s [%d,%d): %s; attempt %d starts", job_id, start, stop, claim.shard.error,
                        claim.shard.attempts)
        if claim.action != "run":
            return ShardOutcome(job_id, start, stop, claim.action, job_status=store.get_job(s, job_id).status)
        job = store.get_job(s, job_id)
        runs = store.job_runs(s, job_id)
        raw = store.load_samples(s, job.dataset_id, start, stop)
        store.heartbeat(s, me, os.getpid(), job_id, claim.shard.id)
    shard_id = claim.shard.id
    heartbeat.working_on(job_id, shard_id)  # the worker's periodic beats report this shard while it runs
    try:
        try:
            done = _evaluate_shard(job, runs, raw, start, shard_id, settings, progress)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the shard, then retried or failed
            return _attempt_failed(job_id, start, stop, shard_id, claim.shard.attempts, exc, settings)
        with session_scope(settings) as s:
            if done < len(raw):
                info = store.finish_shard(s, shard_id, "cancelled")
                return ShardOutcome(job_id, start, stop, "cancelled", done, info.status)
            aggregates.refresh_aggregates(s, [r.id for r in runs])  # computed by the database
            info = store.finish_shard(s, shard_id, "done")
            store.heartbeat(s, me, os.getpid())
        return ShardOutcome(job_id, start, stop, "ran", done, info.status)
    finally:
        heartbeat.working_on(None, None)


class ShardTimeLimit(RuntimeError):
    """An attempt of a shard ran past TAD_SHARD_TIME_LIMIT; what it stored is kept and the next attempt resumes."""


def _evaluate_shard(job: store.JobInfo, runs: list[store.RunInfo], raw: list[dict[str, Any]], start: int,
                    shard_id: int, settings: Settings, progress: Callable[[int], None] | None) -> int:
    """Evaluate the shard's samples batch by batch, storing each batch's rows at once; returns how many samples
    have rows (fewer than the shard's when the job was cancelled). Samples an earlier attempt stored are skipped."""
    from tad_core.evaluate import EvalConfig
    from tad_core.samples import Sample
    from tad_core.strategies import StrategySpec

    from services.budgets import Budgets, generation_over_budget, over_budget, token_counter
    from services.interrupt import Interrupted, interruptible

    started = time.monotonic()
    deadline = started + settings.shard_time_limit if settings.shard_time_limit else None
    spec = job.spec
    pair = get_pair(spec, settings)
    specs = [StrategySpec.from_json(d) for d in spec["strategies"]]
    config = EvalConfig.from_json(spec["config"])
    run_ids = {r.key: r.id for r in runs}
    specs, run_ids = _resolve_calibrations(job, runs, specs, run_ids, pair, settings)
    samples = [Sample.from_dict(d) for d in raw]
    with session_scope(settings) as s:
        stored = store.stored_sample_indices(s, list(run_ids.values()), start, start + len(samples))
    todo = [(start + i, smp) for i, smp in enumerate(samples) if start + i not in stored]
    done = len(samples) - len(todo)
    if done:
        log.info("shard %s [%d,%d): resuming after %d stored samples", job.id, start, start + len(samples), done)
        if progress is not None:
            progress(done)
    budgets = Budgets.from_settings(settings)
    count = token_counter(pair.tokenizer)
    gen_error = generation_over_budget(config.max_new_tokens, budgets)
    context = _format_context(job, config.format, settings)
    bs = max(1, int(getattr(config, "batch_size", 8) or 8))

    def why_interrupt() -> str | None:
        if deadline is not None and time.monotonic() > deadline:
            return "time limit"
        with session_scope(settings) as s:
            return "cancelled" if store.cancel_requested(s, job.id) else None

    for i in range(0, len(todo), bs):
        with session_scope(settings) as s:
            if store.cancel_requested(s, job.id):
                return done
        if deadline is not None and time.monotonic() > deadline:
            raise ShardTimeLimit(f"shard time limit of {settings.shard_time_limit:g} s exceeded "
                                 f"(TAD_SHARD_TIME_LIMIT); {done} samples stored")
        batch = todo[i:i + bs]
        _test_fault([smp for _, smp in batch])
        rows: list[dict[str, Any]] = []
        runnable = []
        for index, smp in batch:
            why = over_budget(smp, budgets, count, config.delimiter) or (gen_error if smp.kind == "gen" else None)
            if why:
                log.warning("job %s sample %d (%s) skipped: over budget: %s", job.id, index, smp.id, why)
                rows += error_rows(index, smp.id, run_ids, f"over budget: {why}")
            else:
                runnable.append((index, smp))
        try:
            with interruptible(why_interrupt, settings.interrupt_check_interval):
                rows += _evaluate_isolated(pair, runnable, specs, config, context, run_ids, job.id)
        except Interrupted:
            clear_pair_cache()  # the model was stopped mid-call: the next shard loads a fresh copy
            if deadline is not None and time.monotonic() > deadline:
                raise ShardTimeLimit(f"shard time limit of {settings.shard_time_limit:g} s exceeded "
                                     f"(TAD_SHARD_TIME_LIMIT); {done} samples stored") from None
            log.info("job %s cancelled: shard at %d interrupted mid-batch", job.id, start)
            return done
        with session_scope(settings) as s:
            store.upsert_sample_results(s, rows)
            done += len(batch)
            store.shard_progress(s, shard_id, done)
        if progress is not None:
            progress(len(batch))
    return done


def _evaluate_isolated(pair: Any, items: list[tuple[int, Any]], specs: list[Any], config: Any, context: Any,
                       run_ids: dict[str, int], job_id: int) -> list[dict[str, Any]]:
    """Rows of `items` ((sample index, Sample) pairs) evaluated as one batch; when the batch raises, each sample
    is evaluated alone, so one poisoned sample gets error rows and costs its batch-mates nothing. Database
    trouble is not the samples' fault: it propagates (the attempt is retried)."""
    from tad_core.evaluate import evaluate_batch

    if not items:
        return []
    batch = [smp for _, smp in items]
    try:
        _test_sample_fault(batch)
        results = evaluate_batch(pair, batch, specs, config, context)
    except Exception as exc:  # noqa: BLE001 - isolated below; recorded on the sample when it fails alone
        if _transient(exc):
            raise
        if len(items) > 1:
            return [row for item in items
                    for row in _evaluate_isolated(pair, [item], specs, config, context, run_ids, job_id)]
        index, smp = items[0]
        error = f"{type(exc).__name__}: {exc}"
        log.warning("job %s sample %d (%s) failed: %s", job_id, index, smp.id, error)
        return error_rows(index, smp.id, run_ids, error)
    return [row for (index, _), res in zip(items, results) for row in result_rows([res], index, run_ids)]


def _format_context(job: store.JobInfo, fmt: str, settings: Settings) -> Any:
    """The job's prompt-format context: its dataset's name (per-dataset wording) and, for k-shot, the
    demonstration pool (the registered train split, else the job's whole dataset from the DB)."""
    from tad_core.formats import format_context, parse_format
    from tad_core.samples import Sample

    name = str(job.spec.get("dataset", ""))
    pool: list[Any] = []
    if parse_format(fmt).needs_pool:
        from tad_core.datasets import REGISTRY

        if name not in REGISTRY:
            with session_scope(settings) as s:
                pool = [Sample.from_dict(d) for d in store.load_samples(s, job.dataset_id, 0, 1 << 30)]
    return format_context(fmt, name, pool)


def _resolve_calibrations(job: store.JobInfo, runs: list[store.RunInfo], specs: list[Any], run_ids: dict[str, int],
                          pair: Any, settings: Settings) -> tuple[list[Any], dict[str, int]]:
    """Turn `svdecode(mu=auto)` into its calibrated numeric mu, once per run: the first shard calibrates (on the
    train split of the job's registered dataset; stored and reused, see tad_core.calibration) and records
    mu + calibration key in the run's `info`; every later shard, on any worker, uses the recorded values.
    Outcomes of a resolved spec are stored under the original run (its key keeps `mu=auto`)."""
    from tad_core.calibration import cached_calibration, needs_calibration
    from tad_core.strategies import StrategySpec, canonical

    if not any(needs_calibration(sp) for sp in specs):
        return specs, run_ids
    by_key = {r.key: r for r in runs}
    out, ids = [], dict(run_ids)
    for sp in specs:
        if not needs_calibration(sp):
            out.append(sp)
            continue
        run = by_key[sp.key]
        if "mu" not in (run.info or {}):
            cal = cached_calibration(pair, job.spec["dataset"], "train", n=settings.calibration_samples,
                                     beta=sp.params["beta"])
            with session_scope(settings) as s:  # first writer wins: a racing shard keeps the recorded values
                if "mu" not in (next(r for r in store.job_runs(s, job.id) if r.id == run.id).info or {}):
                    store.set_run_info(s, run.id, {"mu": float(f"{cal.mu:.6g}"), "calibration": cal.key,
                                                   "calibration_n_tokens": cal.n_tokens,
                                                   "calibration_n_samples": cal.n_samples,
                                                   "calibration_dataset": f"{cal.dataset}:{cal.split}"})
            with session_scope(settings) as s:
                run = next(r for r in store.job_runs(s, job.id) if r.id == run.id)
        resolved = canonical(StrategySpec(sp.name, {**sp.params, "mu": run.info["mu"],
                                                    "calibration": run.info["calibration"]}))
        out.append(resolved)
        ids[resolved.key] = ids.pop(sp.key)
    return out, ids


def _attempt_failed(job_id: int, start: int, stop: int, shard_id: int, attempts: int, exc: BaseException,
                    settings: Settings) -> ShardOutcome:
    error = f"{type(exc).__name__}: {exc}"[:2000]
    transient = _transient(exc)
    log.warning("shard %s [%d,%d) attempt %d failed: %s", job_id, start, stop, attempts, error)
    with session_scope(settings) as s:
        if attempts >= settings.max_redeliveries and not transient:
            info = store.finish_shard(s, shard_id, "failed", f"failed after {attempts} attempts; last error: {error}")
            return ShardOutcome(job_id, start, stop, "failed", 0, info.status)
        store.release_shard(s, shard_id, error, refund_attempt=transient)
    raise ShardRetry(error) from exc


def run_job_embedded(job_id: int, settings: Settings | None = None, *,
                     progress: Callable[[int], None] | None = None) -> store.JobInfo:
    """Execute every open shard of a job in this process, through `run_shard` (the workers' code path)."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status in ("queued", "running")]
    beats = heartbeat.HeartbeatThread(settings, info={"embedded": True})  # so no sweeper takes it for dead
    beats.start()
    try:
        for start, stop in shards:
            while True:
                try:
                    run_shard(job_id, start, stop, settings, progress=progress)
                    break
                except ShardRetry:
                    continue
    finally:
        beats.stop()
    with session_scope(settings) as s:
        return store.get_job(s, job_id)


def enqueue_job(job_id: int, settings: Settings | None = None) -> int:
    """Send one Celery task per open shard of the job; returns how many were sent."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status == "queued"]
    return _send_shards(job_id, shards, settings)


class QueueUnavailable(RuntimeError):
    """A planned job could not be queued (broker unreachable); the job was marked failed so it never waits."""

    def __init__(self, job_id: int, cause: BaseException):
        self.job_id, self.cause = job_id, cause
        super().__init__(f"job {job_id} stored but the broker is unreachable ({cause}); job marked failed")


def enqueue_or_fail(job_id: int, settings: Settings | None = None) -> int:
    """`enqueue_job`, and when the broker cannot take the shards, mark the stored job failed (a job whose
    messages were never sent would otherwise stay queued forever) and raise QueueUnavailable."""
    settings = settings or get_settings()
    try:
        return enqueue_job(job_id, settings)
    except Exception as e:  # noqa: BLE001 - broker unreachable: the stored job must not wait forever
        with session_scope(settings) as s:
            store.mark_job_failed(s, job_id, f"could not queue the shards: {e}")
        raise QueueUnavailable(job_id, e) from e


def requeue_job(job_id: int, settings: Settings | None = None) -> int:
    """Send a job's unfinished shards to the broker again; returns how many were sent.

    For when the broker lost its messages (a Redis without persistence restarted, a flushed queue): the job would
    otherwise wait forever. Queued shards are sent, and running shards whose worker has not beaten within
    `dead_after_s` (TAD_WORKER_DEAD_AFTER, default three heartbeat intervals); a shard whose worker is alive is left to it. A duplicate delivery is harmless anyway:
    `claim_shard` skips finished shards and rows are upserted, so nothing is computed into the results twice.
    """
    settings = settings or get_settings()
    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        if job.finished:
            return 0
        alive = {w.worker for w in store.list_workers(s, seen_within_s=settings.dead_after_s)}
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id)
                  if sh.status == "queued" or (sh.status == "running" and sh.worker not in alive)]
    return _send_shards(job_id, shards, settings)


def sweep_dead_workers(settings: Settings | None = None) -> list[tuple[int, int, int]]:
    """Requeue the running shards of worker processes that stopped beating; returns (job, start, stop) of each
    shard this call requeued.

    Every worker process runs this periodically (services.heartbeat), so a machine that dies loses no shard to
    the broker's visibility timeout (an hour by default) and nobody has to run `tad requeue`. Safe with many
    sweepers at once: `store.requeue_stale_shard` is a conditional UPDATE, so exactly one sweeper wins a shard
    and sends its message; if sending fails the shard is put back as it was and the next sweep tries again.
    """
    settings = settings or get_settings()
    with session_scope(settings) as s:
        stale = store.stale_running_shards(s, settings.dead_after_s)
    requeued = []
    for shard in stale:
        reason = (f"attempt {shard.attempts}: worker process {shard.worker} stopped beating (> "
                  f"{settings.dead_after_s:g} s) or no longer runs it; requeued by {worker_name()}")
        with session_scope(settings) as s:
            if not store.requeue_stale_shard(s, shard, reason):
                continue  # another sweeper, a redelivery or the worker itself got there first
        try:
            _send_shards(shard.job_id, [(shard.start, shard.stop)], settings)
        except Exception as e:  # noqa: BLE001 - broker down: undo, so that the next sweep sends it
            with session_scope(settings) as s:
                store.unrequeue_stale_shard(s, shard)
            log.warning("could not requeue shard %s [%d,%d): %s", shard.job_id, shard.start, shard.stop, e)
            continue
        log.warning("shard %s [%d,%d): %s", shard.job_id, shard.start, shard.stop, reason)
        requeued.append((shard.job_id, shard.start, shard.stop))
    return requeued


def broker_epoch_key(settings: Settings) -> str:
    """The Redis key whose absence tells a sweeper that the broker lost its data (restarted without persistence,
    flushed), and with it the messages of every queued shard."""
    return f"tad:broker-epoch:{settings.queue}"


def recover_lost_queue(settings: Settings | None = None) -> list[tuple[int, int]]:
    """When the broker lost its data, send every queued shard of every unfinished job again; returns
    (job, shards sent) per job. A no-op (one Redis GET) while the broker keeps its data.

    Detection: a marker key lives in the broker; a broker that restarted empty or was flushed has lost it. The
    one sweeper whose SET NX recreates it sends the shards (several sweepers: one winner). A duplicate message is
    harmless (a claimed shard is `busy` or finished for the second one), a lost one would stall the job for ever.
    Only Redis brokers are watched.
    """
    settings = settings or get_settings()
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return []
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        key = broker_epoch_key(settings)
        if client.exists(key) or not client.set(key, worker_name(), nx=True):
            return []
    finally:
        client.close()
    with session_scope(settings) as s:
        todo = {job_id: [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status == "queued"]
                for job_id in store.open_job_ids(s)}
    sent = [(job_id, _send_shards(job_id, shards, settings)) for job_id, shards in todo.items() if shards]
    if sent:
        log.warning("the broker lost its data (marker %s missing): sent the queued shards again: %s",
                    broker_epoch_key(settings), ", ".join(f"job {j}: {n}" for j, n in sent))
    return sent


def _send_shards(job_id: int, shards: list[tuple[int, int]], settings: Settings) -> int:
    from services.celery_app import make_celery

    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        for start, stop in shards:
            app.send_task("tad.run_shard", args=[job_id, start, stop], queue=settings.queue, producer=producer)
    return len(shards)
