"""What a submitter asks for (`SubmitRequest`) and how a refused request is reported (`SubmissionError`).

The data types shared by every step of submission (services.submission, services.model_refs,
services.dataset_input) and by the CLI, the API and the dashboard that build requests; no logic here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class SubmissionError(ValueError):
    """A submission is invalid; `errors` lists every problem found (nothing was stored)."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


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
    source_name: str | None = None  # recorded as a dataset file's source instead of its path (an upload's name)
