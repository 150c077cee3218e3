"""Test-only fault hooks (documented, gated): only when the process has `TAD_ENABLE_TEST_FAULTS=1`,
- a sample whose `metadata` has `"tad_test_raise": "<message>"` raises RuntimeError(message) when evaluated
  (submitted data alone can never trigger it; the tests use it for a poisoned sample);
- `"tad_test_fail_shard": "<message>"` makes the whole batch holding the sample raise before any evaluation (a
  shard that fails every attempt: the attempt cap);
- `"tad_test_sleep": <seconds>` sleeps that long (in short steps, like decoding steps) when the sample is evaluated;
- `TAD_TEST_BATCH_DELAY=<seconds>` sleeps that long before each batch, standing in for slower (GPU-sized)
  batches so the tests can interrupt a job mid-way deterministically.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any


def _test_faults_enabled() -> bool:
    return os.environ.get("TAD_ENABLE_TEST_FAULTS") == "1"


def _test_meta(sample: Any, key: str) -> Any:
    return sample.metadata.get(key) if isinstance(sample.metadata, dict) else None


def batch_fault(samples: Sequence[Any]) -> None:
    """Batch-level test hooks (see the module docstring): the batch delay and a failing shard."""
    if not _test_faults_enabled():
        return
    delay = float(os.environ.get("TAD_TEST_BATCH_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    for sample in samples:
        if msg := _test_meta(sample, "tad_test_fail_shard"):
            raise RuntimeError(f"test fault on shard at sample {sample.id}: {msg}")


def sample_fault(samples: Sequence[Any]) -> None:
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
