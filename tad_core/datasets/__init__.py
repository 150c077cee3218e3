"""Datasets: the canonical JSONL format, its validator, and the registered offline datasets."""
from tad_core.datasets.catalog import (
    REGISTRY,
    DatasetFetchError,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSpec,
    LoadedDataset,
    fetch,
    fetch_all,
    is_complete,
    list_datasets,
    load_dataset,
)
from tad_core.datasets.validate import (
    DatasetLimits,
    DatasetValidationError,
    dumps_jsonl,
    validate_jsonl,
    write_jsonl,
)

__all__ = [
    "REGISTRY",
    "DatasetFetchError",
    "DatasetInfo",
    "DatasetLimits",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DatasetValidationError",
    "LoadedDataset",
    "dumps_jsonl",
    "fetch",
    "fetch_all",
    "is_complete",
    "list_datasets",
    "load_dataset",
    "validate_jsonl",
    "write_jsonl",
]
