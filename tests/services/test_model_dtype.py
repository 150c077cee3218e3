"""The worker dtype: resolved at submission into the job's config (part of each run's identity), loaded by the
worker; a bad name is refused naming the field, with nothing stored."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from services.db import store
from services.db.schema import upgrade
from services.db.session import session_scope
from services.model_cache import clear_pair_cache, get_pair
from services.planning import plan_job
from services.shard_runner import run_job_embedded
from services.submit_request import SubmissionError, SubmitRequest
from services.settings import Settings
from tests.services.helpers import make_settings, write_mc_dataset


@pytest.fixture
def roots(tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> list[Path]:
    return [tiny_model_dir.parent.parent, tmp_path]


def _req(tiny_model_dir: Path, tiny_lora_dir: Path, dataset: Path, **config) -> SubmitRequest:
    return SubmitRequest(dataset=str(dataset), base=str(tiny_model_dir), adapter=str(tiny_lora_dir),
                         strategies=["ft", "tad"], config={"batch_size": 4, **config})


def test_dtype_is_resolved_into_the_run_identity(sqlite_url, tiny_model_dir, tiny_lora_dir, roots, tmp_path):
    upgrade(sqlite_url)
    data = write_mc_dataset(tmp_path / "d.jsonl", 4)
    auto = make_settings(sqlite_url, roots)  # TAD_DTYPE=auto on a CPU deployment: float32
    with pytest.raises(SubmissionError, match="dtype must be one of") as err:
        plan_job(_req(tiny_model_dir, tiny_lora_dir, data, dtype="int8"), auto)
    assert "generation config" in str(err.value)
    with session_scope(auto) as s:
        assert store.list_jobs(s) == []  # nothing stored
    fp32 = plan_job(_req(tiny_model_dir, tiny_lora_dir, data), auto)
    explicit = plan_job(_req(tiny_model_dir, tiny_lora_dir, data, dtype="float32"), auto)
    bf16 = plan_job(_req(tiny_model_dir, tiny_lora_dir, data, dtype="bf16"), auto)
    by_setting = plan_job(_req(tiny_model_dir, tiny_lora_dir, data), make_settings(sqlite_url, roots, dtype="bfloat16"))
    assert "dtype" not in fp32.job.spec["config"]  # float32 keeps the identity runs had before the setting
    assert bf16.job.spec["config"]["dtype"] == by_setting.job.spec["config"]["dtype"] == "bfloat16"
    hashes = {name: [r.run_hash for r in p.runs] for name, p in
              (("fp32", fp32), ("explicit", explicit), ("bf16", bf16), ("setting", by_setting))}
    assert hashes["fp32"] == hashes["explicit"] and hashes["bf16"] == hashes["setting"]
    assert set(hashes["fp32"]).isdisjoint(hashes["bf16"])
    clear_pair_cache()
    try:
        info = run_job_embedded(bf16.job.id, auto)
        assert info.status == "done" and info.samples_done == 4
        pair = get_pair(bf16.job.spec, auto)  # the pair the worker ran with, from its per-process cache
        assert {p.dtype for p in pair.model.parameters()} == {torch.bfloat16}
        assert get_pair(fp32.job.spec, auto).model.dtype == torch.float32  # another dtype: another pair
    finally:
        clear_pair_cache()


def test_tad_dtype_setting_is_checked():
    assert Settings(dtype="BF16").dtype == "bfloat16" and Settings().dtype == "auto"
    with pytest.raises(ValidationError, match="TAD_DTYPE must be one of"):
        Settings(dtype="int8")
