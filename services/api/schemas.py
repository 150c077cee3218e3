"""Request and response bodies of the HTTP API (pydantic), and their conversion from the store's dataclasses.

Defaults come from `services.submit_request.SubmitRequest`, and a body becomes a SubmitRequest for `plan_job`: the API
adds no submission rule of its own except that a dataset is a registered name or an upload (a server path would
let a caller read the server's files).
"""
from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from services.db import store
from services.export import plain
from services.submit_request import SubmitRequest

MAX_TEXT = 1000  # longest accepted free-text field: names and paths, never content


def _no_nul(value: Any) -> Any:
    """Refuse NUL characters in every string (databases and file systems refuse them later, less clearly)."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if isinstance(value, list):
        for item in value:
            _no_nul(item)
    if isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k)
            _no_nul(v)
    return value


class SubmitOptions(BaseModel):
    """Everything of a submission except the dataset (the upload endpoint takes the dataset as a file)."""

    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(default_factory=lambda: list(SubmitRequest.strategies), max_length=64,
                                  description="strategy specs, e.g. ft, base, tad:alpha=0.5,1")
    base: str = Field(default=SubmitRequest.base, max_length=MAX_TEXT,
                      description="registered base model name or model directory on the server")
    adapter: str | None = Field(default=None, max_length=MAX_TEXT,
                                description="NAME:VERSION of a registered adapter, or an adapter directory")
    finetuned: str | None = Field(default=None, max_length=MAX_TEXT, description="fully fine-tuned model directory")
    adapter_name: str | None = Field(default=None, max_length=200,
                                     description="name to register a new adapter directory under")
    split: str = Field(default=SubmitRequest.split, max_length=50)
    limit: int | None = Field(default=None, ge=1, le=2**31 - 1, description="first N samples only")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="generation config (EvalConfig fields: batch_size, format, ...)")
    shard_size: int | None = Field(default=None, ge=1, le=1024)

    @field_validator("strategies", "base", "adapter", "finetuned", "adapter_name", "split", "config")
    @classmethod
    def _reject_nul(cls, value: Any) -> Any:
        return _no_nul(value)

    @field_validator("strategies")
    @classmethod
    def _short_items(cls, value: list[str]) -> list[str]:
        for item in value:
            if len(item) > MAX_TEXT:
                raise ValueError(f"a strategy spec is longer than {MAX_TEXT} characters")
        return value

    def to_request(self, dataset: str, submitted_by: str, owner_id: int, token: str | None,
                   source_name: str | None = None) -> SubmitRequest:
        """The SubmitRequest `plan_job` validates and stores (`token`: the deployment's submit token, which the
        server holds so that its users need none; `source_name`: an uploaded file's name)."""
        return SubmitRequest(dataset=dataset, strategies=list(self.strategies), base=self.base, adapter=self.adapter,
                             finetuned=self.finetuned, adapter_name=self.adapter_name, split=self.split,
                             limit=self.limit, config=dict(self.config), submitted_by=submitted_by, token=token,
                             shard_size=self.shard_size, owner_id=owner_id, source_name=source_name)


class SubmitBody(SubmitOptions):
    """A submission on a registered dataset (`tad datasets list`)."""

    dataset: str = Field(min_length=1, max_length=200, description="registered dataset name")

    @field_validator("dataset")
    @classmethod
    def _dataset_nul(cls, value: str) -> str:
        return _no_nul(value)


def _fields_of(cls: type, drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    """pydantic field definitions of a store dataclass (its resolved annotations, every field required), so a
    response body restates no field of the store's type."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls) if f.name not in drop}


JobOut = create_model(
    "JobOut",
    __doc__="A job with its progress and its owner: the store's JobInfo without the owner's id, plus the owner's "
            "name, the progress fraction and whether it ended.",
    **_fields_of(store.JobInfo, drop=frozenset({"owner_id"})),
    owner=(str | None, ...),
    progress=(float, Field(description="samples done / samples, 0..1")),
    finished=(bool, ...),
)


class SubmittedJob(JobOut):  # type: ignore[misc,valid-type]
    shards_queued: int


class RequeuedJob(BaseModel):
    job_id: int
    shards_sent: int


class ResultsOut(BaseModel):
    job: JobOut  # type: ignore[valid-type]
    leaderboard: list[dict[str, Any]]


class RegisterBody(BaseModel):
    """An adapter directory on the server (inside its model roots) to register as a version of family `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="adapter family name (letters, digits, _ . -)")
    path: str = Field(min_length=1, max_length=MAX_TEXT, description="PEFT adapter directory on the server")
    version: int | None = Field(None, ge=1, le=2**31 - 1, description="version number (default: the next one)")
    base: str | None = Field(None, min_length=1, max_length=MAX_TEXT, description="base model (default: the "
                                                                                 "adapter's manifest)")
    gate: list[str] = Field(default_factory=list, max_length=20, description="suites to gate the version on "
                                                                            "(default: the family's gate suites)")
    alpha: float = Field(0.05, gt=0, le=1, description="gate significance level")
    min_effect: float = Field(0.01, ge=0, lt=1, description="gate: smallest accuracy change that counts")


def gate_out(gate: store.GateRunInfo) -> dict[str, Any]:
    """A gate as the API shows it (JSON-safe, with its verdict: null until one lands)."""
    return {**plain(gate), "verdict": gate.verdict, "finished": gate.finished}


def job_out(job: store.JobInfo, owner: str | None) -> dict[str, Any]:
    """A JobInfo as the API shows it (JSON-safe, with the owner's name and the progress fraction)."""
    data = plain(job)
    data.pop("owner_id", None)
    return {**data, "owner": owner, "progress": job.fraction, "finished": job.finished}
