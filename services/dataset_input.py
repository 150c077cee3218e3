"""The dataset of a request, loaded and validated at submission: a registered dataset, a local lm-eval task
(`lmeval:TASK.yaml`) or a canonical JSONL file, under the deployment's size limits."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.settings import Settings
from services.submit_request import SubmitRequest


@dataclass(frozen=True)
class DatasetData:
    name: str
    split: str
    content_hash: str
    task_type: str
    source: str
    samples: list[dict[str, Any]]


def check_dataset(req: SubmitRequest, settings: Settings, errors: list[str]) -> DatasetData | None:
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
    return DatasetData(name, req.split, content_hash, task_type, source, [s.to_dict() for s in samples])


def line_numbers(source: str) -> list[int] | None:
    """Line number of each sample of a JSONL file (blank lines are skipped by the validator), or None."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    return [n for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if raw.strip()]
