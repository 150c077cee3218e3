"""The job dataset a user's reference resolves to, for `tad run` and `tad submit`.

The job planner takes a registered name, `lmeval:TASK.yaml` or one canonical `.jsonl` file. A user's `.json`
array, a file holding several splits, one file per split (`NAME=train.jsonl,val.jsonl`), a chosen label
(`--dataset-name`) or shuffled choices (`--shuffle-choices`) are resolved here with tad_core's loader, and the
selected split is written once as a canonical file named by the label, in a folder named by its content hash under
the cache (`user_datasets/<hash>/<label>.jsonl`): the stored dataset then has the user's label, the split's own
hash, and a file that stays where the job's source says it is.
"""
from __future__ import annotations

from pathlib import Path

from tad_core.datasets import REGISTRY, DatasetValidationError, load_dataset, write_jsonl
from tad_core.datasets.user_files import is_user_reference
from tad_core.paths import cache_subdir


def needs_resolving(dataset: str, name: str | None, shuffle: int | None) -> bool:
    """False when the planner can take the reference as it is (registered, lmeval:, a plain .jsonl path)."""
    if name or shuffle is not None:
        return True
    return dataset not in REGISTRY and not dataset.startswith("lmeval:") and is_user_reference(dataset)


def resolve_dataset(dataset: str, split: str, name: str | None = None, shuffle: int | None = None) -> str:
    """The reference to plan the job with: `dataset` unchanged when nothing needs reading, else the canonical file
    of the selected split. Raises services.submit_request.SubmissionError (every problem named; nothing stored)."""
    from services.dataset_input import dataset_limits
    from services.settings import get_settings
    from services.submit_request import SubmissionError

    if not needs_resolving(dataset, name, shuffle):
        return dataset
    try:
        loaded = load_dataset(dataset, split, shuffle_choices=shuffle, name=name,
                              limits=dataset_limits(get_settings()))
    except DatasetValidationError as e:
        raise SubmissionError([f"dataset {dataset!r}: {msg}" for msg in e.errors]) from None
    except (ValueError, OSError) as e:
        raise SubmissionError([f"dataset {dataset!r}: {e}"]) from None
    plain = Path(dataset).expanduser()
    if name is None and shuffle is None and plain.suffix == ".jsonl" and loaded.source == str(plain.resolve()):
        return dataset  # one .jsonl file without split fields: the planner reads it itself (line numbers kept)
    out = cache_subdir("user_datasets", loaded.content_hash[:16]) / f"{loaded.name}.jsonl"
    if not out.exists():
        write_jsonl(loaded.samples, out)
    return str(out)
