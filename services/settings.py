"""Service settings: one pydantic-settings class read from `TAD_*` environment variables.

Credentials (database URL with password, broker URL, submit token) come only from the environment (or an
`.env` file named by `TAD_ENV_FILE`); nothing here is ever written to the database or logs.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from tad_core.datasets.validate import DatasetLimits
from tad_core.paths import cache_dir


def _default_database_url() -> str:
    return f"sqlite:///{cache_dir() / 'tad.db'}"


class Settings(BaseSettings):
    """Everything the services (CLI, workers, dashboard) need to know about their deployment."""

    model_config = SettingsConfigDict(env_prefix="TAD_", env_file=os.environ.get("TAD_ENV_FILE"), extra="ignore")

    database_url: str = Field(default_factory=_default_database_url)
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Celery queue the shards go to (one per deployment; tests use their own).
    queue: str = "tad"
    # Directories adapters / fine-tuned models / base model directories must live under (os.pathsep or comma
    # separated). Empty = the current working directory and the TaD cache only.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    submit_token: SecretStr | None = None
    shard_size: int = Field(default=24, ge=1, le=1024)
    # A shard started this many times without finishing is marked failed (a poisoned shard must not loop).
    max_redeliveries: int = Field(default=3, ge=1, le=50)
    # Seconds Redis waits for an ack before redelivering an unacked task; must exceed the longest shard.
    visibility_timeout: int = Field(default=3600, ge=2)
    # Seconds between the worker's sweeps that give unacked messages of dead workers back to the queue (once
    # older than visibility_timeout). Kombu's default sweep is ~100 s apart.
    restore_interval: int = Field(default=30, ge=1)
    # Worker heartbeat period (seconds) written to worker_heartbeats.
    heartbeat_interval: float = Field(default=10.0, gt=0)
    # Train samples svdecode(mu=auto) calibrates on (the split's first N with a gold continuation); part of the
    # calibration key. Lower it where the forward over long train contexts is slow (a CPU).
    calibration_samples: int = Field(default=128, ge=1)
    # A worker whose last heartbeat is older than this many seconds counts as dead: every worker's sweep gives its
    # running shards back to the queue (0 = three heartbeat intervals).
    worker_dead_after: float = Field(default=0.0, ge=0)
    # Seconds between two sweeps for dead workers' shards in each worker process (0 = one heartbeat interval).
    # A queued shard or gate older than this whose message is in neither the queue nor the unacked set is sent
    # again (services.queueing.recover_orphans); also the least time between two such checks in the deployment.
    orphan_after: float = Field(default=60.0, gt=0)
    sweep_interval: float = Field(default=0.0, ge=0)
    # Seconds a freshly forked pool process may take to report itself up before Celery kills it. Celery's default
    # (4 s) is shorter than a cold torch/transformers import, which made workers kill their children in a loop.
    worker_proc_alive_timeout: float = Field(default=120.0, gt=0)
    # Dataset limits enforced on submission.
    max_dataset_rows: int = Field(default=DatasetLimits.max_rows, ge=1)
    max_sample_chars: int = Field(default=DatasetLimits.max_field_chars, ge=1)
    max_dataset_bytes: int = Field(default=DatasetLimits.max_bytes, ge=1)
    # Per-sample budgets (services.budgets), enforced at submission and again in the worker; tokens are the base
    # model's tokens.
    max_choices: int = Field(default=64, ge=2)
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_continuation_tokens: int = Field(default=512, ge=1)
    max_generated_tokens: int = Field(default=1024, ge=1)
    # Seconds one attempt of a shard may run before it is interrupted and counted as failed (0 = no limit); the
    # samples it stored are kept and the next attempt resumes after them.
    shard_time_limit: float = Field(default=3600.0, ge=0)
    # Seconds between a running batch's checks for a cancel request or the shard time limit.
    interrupt_check_interval: float = Field(default=1.0, gt=0)
    device: str = "cpu"
    # dtype the workers load models in when a job does not name one (`--dtype`): auto (bfloat16 on a CUDA device
    # that supports it, float32 on the CPU), float32, bfloat16 or float16. Resolved at submission, against
    # `device`, into the job's config: it is part of every run's identity.
    dtype: str = "auto"
    allow_pickle: bool = False

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str) -> str:
        from tad_core.dtypes import ALIASES, CHOICES

        key = ALIASES.get(v.lower(), v.lower())
        if key not in CHOICES:
            raise ValueError(f"TAD_DTYPE must be one of {', '.join(CHOICES)}, got {v!r}")
        return key

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: object) -> object:
        if isinstance(v, str):
            parts = [p for chunk in v.split(os.pathsep) for p in chunk.split(",")]
            return [Path(p.strip()).expanduser() for p in parts if p.strip()]
        return v

    def allowed_roots(self) -> list[Path]:
        """Resolved model roots; the defaults when none are configured."""
        roots = self.model_roots or [Path.cwd(), cache_dir()]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def dead_after_s(self) -> float:
        """Heartbeat silence (seconds) after which a worker process is considered dead."""
        return self.worker_dead_after or 3 * self.heartbeat_interval

    @property
    def sweep_every_s(self) -> float:
        """Seconds between two dead-worker sweeps of one worker process."""
        return self.sweep_interval or self.heartbeat_interval

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached; tests build `Settings(...)` directly instead)."""
    return Settings()
