"""Per-sample budgets and interruption, with real `tad worker` processes, a private Redis and Postgres.

- Submission refuses a 10k-choice line and a prompt of ~50k tokens that is under the character limit (4-byte
  characters), naming line, id and field; nothing is stored.
- In the worker: a sample over budget and a sample whose evaluation raises each get rows recording the error, and
  every other sample of their shard is stored as usual: the job ends `done`, nothing lost.
- `tad cancel` interrupts a batch that is running (a slow sample) within seconds.
- A shard past TAD_SHARD_TIME_LIMIT is interrupted; its stored samples are kept and later attempts resume after
  them, so only the slow sample's shard ends failed, at the attempt cap.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from services.db import store
from services.db.schema import upgrade
from services.db.session import session_scope
from services.planning import plan_job
from services.queueing import enqueue_job
from services.settings import Settings
from services.submit_request import SubmissionError, SubmitRequest
from tests.services.helpers import tad_cli, write_mc_dataset
from tests.services.test_fault_tolerance import _assert_complete, _job, _shards, _submit, _wait, _wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_submission_refuses_samples_over_budget_nothing_stored(pg_url: str, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    upgrade(pg_url)
    settings = Settings(database_url=pg_url, model_roots=[tiny_model_dir.parent.parent, tmp_path])
    rows = [{"id": "ok", "prompt": "Q?", "choices": ["a", "b"], "answer": 0},
            {"id": "wide", "prompt": "Q?", "choices": [f"c{i}" for i in range(10_000)], "answer": 0},
            {"id": "huge", "prompt": "\U0001d518" * 16_700, "choices": ["a", "b"], "answer": 1}]
    data = tmp_path / "over.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]))
    req = SubmitRequest(dataset=str(data), base=str(tiny_model_dir), strategies=["ft"],
                        config={"max_new_tokens": 5000})
    with pytest.raises(SubmissionError) as e:
        plan_job(req, settings)
    msg = "\n".join(e.value.errors)
    assert "line 3 (id 'wide'): field 'choices': 10000 choices, over TAD_MAX_CHOICES=64" in msg  # blank line 2
    assert "line 4 (id 'huge'): field 'prompt':" in msg and "over TAD_MAX_PROMPT_TOKENS=4096" in msg
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM datasets")).scalar() == 0
        assert c.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    engine.dispose()


def test_poisoned_and_over_budget_samples_fail_alone_in_the_worker(service: dict) -> None:
    settings = service["settings"]
    loose = settings.model_copy(update={"max_choices": 100})  # submitted where the limit was looser
    rows = [{"id": f"q{i}", "prompt": f"Question {i}? Answer:", "choices": ["yes", "no"], "answer": i % 2}
            for i in range(12)]
    rows[5]["choices"] = [f"option {k}" for k in range(20)]  # over the worker's TAD_MAX_CHOICES=8
    rows[6]["metadata"] = {"tad_test_raise": "poisoned sample"}  # its evaluation raises
    data = service["tmp"] / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    req = SubmitRequest(dataset=str(data), base=str(service["model"]), adapter=str(service["lora"]),
                        strategies=["ft", "tad:alpha=1"], config={"batch_size": 4}, shard_size=8)
    job_id = plan_job(req, loose).job.id
    enqueue_job(job_id, settings)
    service["start_worker"]("a", TAD_MAX_CHOICES="8", TAD_TEST_BATCH_DELAY="0")
    job = _wait_finished(service, job_id)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 12)  # every row once, the two bad samples included
    assert all(sh.attempts == 1 and sh.status == "done" for sh in _shards(settings, job_id))  # no attempt lost
    with session_scope(settings) as s:
        for run in store.job_runs(s, job_id):
            by_index = {r["sample_index"]: r for r in store.sample_rows(s, run.id)}
            assert "20 choices, over TAD_MAX_CHOICES=8" in by_index[5]["error"] and by_index[5]["pred"] is None
            assert "poisoned sample" in by_index[6]["error"] and by_index[6]["correct"] is None
            assert all(r["error"] is None and r["pred"] is not None for i, r in by_index.items() if i not in (5, 6))
            assert store.run_aggregates(s, run.id)["acc"][2] == 10  # accuracy over the 10 evaluated samples
            assert store.run_aggregates(s, run.id)["errors"][0] == 2


def test_cancel_interrupts_a_running_batch_within_seconds(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 8, shard_size=8, meta={1: {"tad_test_sleep": 120}})  # batch 0 would take 2 minutes
    service["start_worker"]("a", TAD_TEST_BATCH_DELAY="0", TAD_INTERRUPT_CHECK_INTERVAL="0.5")
    _wait(lambda: (sh := _shards(settings, job_id)[0]).status == "running" and sh, 90, "the slow batch", service)
    time.sleep(1.0)  # inside the slow sample now
    r = tad_cli(service["env"], "cancel", str(job_id), timeout=60)
    assert r.returncode == 0, r.stderr
    asked = time.monotonic()
    job = _wait(lambda: (j := _job(settings, job_id)).finished and j, 20, "the cancelled job to end", service)
    assert job.status == "cancelled" and time.monotonic() - asked < 10
    assert _shards(settings, job_id)[0].status == "cancelled"
    # the worker is still in service: a new job runs to completion
    again = _submit(service, 4, name="after")
    assert _wait_finished(service, again).status == "done"


def test_shard_time_limit_interrupts_and_later_attempts_resume(service: dict) -> None:
    settings = service["settings"]
    # shard [4, 8): samples 4 and 5 are quick, sample 6 sleeps 60 s, far past the 3 s limit
    job_id = _submit(service, 12, shard_size=4, meta={6: {"tad_test_sleep": 60}})
    w = service["start_worker"]("a", TAD_TEST_BATCH_DELAY="0", TAD_SHARD_TIME_LIMIT="3",
                                TAD_INTERRUPT_CHECK_INTERVAL="0.5")
    job = _wait_finished(service, job_id, timeout=150)
    assert job.status == "partial" and "time limit" in (job.error or "")
    shards = {x.start: x for x in _shards(settings, job_id)}
    assert shards[4].status == "failed" and shards[4].attempts == settings.max_redeliveries
    assert all(x.status == "done" and x.attempts == 1 for st, x in shards.items() if st != 4)
    with session_scope(settings) as s:
        for run in store.job_runs(s, job_id):
            assert [r["sample_index"] for r in store.sample_rows(s, run.id)] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert "resuming after 2 stored samples" in w.log.read_text(errors="replace")
