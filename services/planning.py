"""Planning: store a validated request as a job (dataset / adapter registered if new, one run per strategy spec
with its identity hash, the shard ranges). Used by `tad submit`, `tad run`, the API, the dashboard and the
regression gate."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from services.db import store
from services.db.session import session_scope
from services.security import resolve_under_roots
from services.settings import Settings, get_settings
from services.submission import ValidatedRequest, validate_request
from services.submit_request import SubmissionError, SubmitRequest

# Bump when a change alters results, so reuse by run hash never mixes code versions. 2: acc_norm divides by the
# choice without its delimiter (lm-eval). 3: generation's default stop per sample, a seeded generator per sampled
# sequence, ft's token where TaD's clip empties the head, -inf logits read as -1e30; the delimiter always joins an
# MC choice (HellaSwag endings that start with a space scored one space short of lm-eval); first-match reads a
# match's first non-empty group; llm-adapters labels match whole; shuffled sets keep their wording and options.
CODE_VERSION = "3"


@dataclass(frozen=True)
class PlannedJob:
    job: store.JobInfo
    runs: list[store.RunInfo]
    shards: list[tuple[int, int]]
    dataset: store.DatasetInfo
    dataset_created: bool
    adapter: store.AdapterInfo | None
    adapter_created: bool


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


def run_hashes(v: ValidatedRequest, adapter_sha256: str) -> dict[str, str]:
    """Strategy key -> run hash, for the adapter whose weights have `adapter_sha256` ("" for none)."""
    return {sp.key: run_hash(base_fingerprint=v.side.base_fingerprint, adapter_sha256=adapter_sha256,
                             finetuned_fingerprint=v.side.finetuned_fingerprint,
                             content_hash=v.data.content_hash, split=v.data.split,
                             n_samples=v.n_samples, spec_key=sp.key, config=v.config_json)
            for sp in v.specs}


def plan_job(req: SubmitRequest, settings: Settings | None = None) -> PlannedJob:
    """Validate `req` completely, then store dataset/adapter (if new), the job, its runs and shards.

    Raises SubmissionError (listing every problem) or SecurityError before anything is written.
    """
    settings = settings or get_settings()
    return plan_validated(validate_request(req, settings), settings)


@contextmanager
def _session(settings: Settings, session: Session | None) -> Iterator[Session]:
    """The caller's session (its transaction, committed by the caller) or a managed one of our own."""
    if session is not None:
        yield session
    else:
        with session_scope(settings) as s:
            yield s


def plan_validated(v: ValidatedRequest, settings: Settings | None = None,
                   session: Session | None = None) -> PlannedJob:
    """Store a validated request: dataset/adapter (if new), the job, its runs and shards; in `session` when given
    (so that several jobs and what refers to them commit together: a regression gate's), else committed here."""
    from tad_core.models import model_licence

    settings = settings or get_settings()
    req, specs, side, data, n = v.req, v.specs, v.side, v.data, v.n_samples
    with _session(settings, session) as s:
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
        hashes = run_hashes(v, adapter.sha256 if adapter else "")
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
