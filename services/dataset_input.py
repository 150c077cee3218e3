"""The dataset of a request, loaded and validated at submission: a registered dataset, a local lm-eval task
(`lmeval:TASK.yaml`) or a canonical JSONL file, under the deployment's size limits (`dataset_limits`, also what
the dashboard checks an upload against)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.settings import Settings
from services.submit_request import SubmissionError, SubmitRequest
from services.user_datasets import resolve_dataset
from tad_core.datasets.validate import SPLIT_NAME, jsonl_lines


@dataclass(frozen=True)
class DatasetData:
    name: str
    split: str
    content_hash: str
    task_type: str
    source: str  # what the datasets table records as its origin
    samples: list[dict[str, Any]]
    path: Path | None = None  # the JSONL file read, for line numbers in error messages (None: not a file)


def dataset_limits(settings: Settings) -> Any:
    """The deployment's bounds on a dataset file (TAD_MAX_DATASET_BYTES / _ROWS, TAD_MAX_SAMPLE_CHARS)."""
    from tad_core.datasets import DatasetLimits

    return DatasetLimits(max_bytes=settings.max_dataset_bytes, max_rows=settings.max_dataset_rows,
                         max_field_chars=settings.max_sample_chars)


def check_dataset(req: SubmitRequest, settings: Settings, errors: list[str]) -> DatasetData | None:
    """Load the request's dataset through tad_core's one loader, under the deployment's limits; problems go to
    `errors` (None returned). A file's recorded source is `req.source_name` when given (an upload names the
    file its user sent, not the server's temporary copy), else its absolute path."""
    from tad_core.datasets import REGISTRY, DatasetValidationError, load_dataset

    if req.limit is not None and req.limit < 1:
        errors.append(f"--limit must be a positive integer, got {req.limit}")
        return None
    if not SPLIT_NAME.match(req.split):  # a file without split fields takes the name as given: keep it a name
        errors.append(f"--split {req.split!r}: a split name is 1-50 letters, digits, '_' or '-'")
        return None
    try:  # a .json array, a file holding several splits: the selected split as one canonical file
        req = replace(req, dataset=resolve_dataset(req.dataset, req.split))
    except SubmissionError as e:
        errors.extend(e.errors)
        return None
    is_file = not (req.dataset in REGISTRY or req.dataset.startswith("lmeval:"))  # lmeval:TASK.yaml: tad_core.lmeval
    if is_file:
        path = Path(req.dataset).expanduser()
        if path.suffix != ".jsonl" or not path.is_file():
            errors.append(f"dataset {req.dataset!r}: not a registered dataset ({', '.join(REGISTRY)}) "
                          "nor an existing .jsonl file")
            return None
    try:
        ds = load_dataset(req.dataset, split=req.split, limits=dataset_limits(settings))
    except DatasetValidationError as e:
        errors.extend(f"dataset {req.dataset!r}: {msg}" for msg in e.errors)
        return None
    except (ValueError, OSError) as e:
        errors.append(f"dataset {req.dataset!r}: {e}")
        return None
    if len(ds.name) > 200:  # datasets.name is a VARCHAR(200)
        errors.append(f"dataset {req.dataset!r}: its name {ds.name[:60]!r}... is {len(ds.name)} characters, at most "
                      "200 (give a shorter --dataset-name)")
        return None
    if len(ds.samples) > settings.max_dataset_rows:
        errors.append(f"dataset {req.dataset!r} has {len(ds.samples)} rows, over TAD_MAX_DATASET_ROWS="
                      f"{settings.max_dataset_rows}")
        return None
    source = (req.source_name or ds.source) if is_file else ds.source
    return DatasetData(ds.name, req.split, ds.content_hash, ds.task_type, source,
                       [s.to_dict() for s in ds.samples], Path(ds.source) if is_file else None)


def line_numbers(path: Path | None) -> list[int] | None:
    """Line number of each sample of a JSONL file (blank lines are skipped by the validator), or None."""
    if path is None or not path.is_file():
        return None
    return [n for n, raw in enumerate(jsonl_lines(path.read_bytes().decode("utf-8")), start=1)
            if raw.strip()]
