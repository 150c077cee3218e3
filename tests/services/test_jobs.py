"""Planning and the shard function on the tiny random model, in-process (embedded mode)."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.db import store
from services.db.schema import upgrade
from services.db.session import session_scope
from services.planning import plan_job
from services.security import SecurityError
from services.shard_runner import run_job_embedded, run_shard
from services.submit_request import SubmissionError, SubmitRequest
from tests.services.helpers import make_settings, write_mc_dataset


@pytest.fixture
def roots(tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> list[Path]:
    return [tiny_model_dir.parent.parent, tmp_path]


def _req(tiny_model_dir: Path, tiny_lora_dir: Path, dataset: Path, **kw) -> SubmitRequest:
    kw.setdefault("adapter", str(tiny_lora_dir))
    return SubmitRequest(dataset=str(dataset), base=str(tiny_model_dir),
                         strategies=kw.pop("strategies", ["ft", "base", "tad:alpha=0.5,2"]),
                         config=kw.pop("config", {"batch_size": 4}), **kw)


def test_plan_validates_everything_before_storing(sqlite_url, tiny_model_dir, tiny_lora_dir, roots, tmp_path):
    upgrade(sqlite_url)
    settings = make_settings(sqlite_url, roots)
    good = write_mc_dataset(tmp_path / "d.jsonl", 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "choices": ["x", "y"], "answer": 5}\n{"id": "b"}\n')
    with pytest.raises(SubmissionError) as err:
        plan_job(_req(tiny_model_dir, tiny_lora_dir, good, strategies=["tad:alpha=oops", "nope"]), settings)
    assert "alpha" in str(err.value) and "'nope'" in str(err.value)
    with pytest.raises(SubmissionError, match="line 1"):
        plan_job(_req(tiny_model_dir, tiny_lora_dir, bad), settings)
    with pytest.raises(SubmissionError, match="no adapter_config.json"):
        plan_job(_req(tiny_model_dir, tmp_path, good), settings)
    with pytest.raises(SubmissionError, match="not registered"):
        plan_job(_req(tiny_model_dir, tiny_lora_dir, good, adapter="lora:7"), settings)
    with pytest.raises(SubmissionError, match="outside the allowed model roots"):
        plan_job(_req(tiny_model_dir, tiny_lora_dir, good, adapter=str(tiny_lora_dir / ".." / ".." / ".." / "etc")),
                 settings)
    link = tmp_path / "sneaky"
    link.symlink_to("/etc")
    with pytest.raises(SubmissionError, match="outside the allowed model roots"):
        plan_job(_req(tiny_model_dir, tiny_lora_dir, good, adapter=str(link)), settings)
    with pytest.raises(SecurityError, match="token"):
        plan_job(_req(tiny_model_dir, tiny_lora_dir, good), make_settings(sqlite_url, roots, submit_token="s3"))
    with session_scope(settings) as s:  # nothing was stored by any refused submission
        assert store.list_jobs(s) == [] and store.list_datasets(s) == [] and store.list_adapters(s) == []
    p1 = plan_job(_req(tiny_model_dir, tiny_lora_dir, good, shard_size=2), settings)
    p2 = plan_job(_req(tiny_model_dir, tiny_lora_dir, good, adapter=f"{tiny_lora_dir.name}:1", limit=3), settings)
    assert p1.dataset_created and not p2.dataset_created and p1.dataset.id == p2.dataset.id
    assert p1.adapter_created and p2.adapter.id == p1.adapter.id
    assert p1.shards == [(0, 2), (2, 4), (4, 5)] and p2.job.n_samples == 3
    assert [r.key for r in p1.runs] == ["ft", "base", "tad(alpha=0.5,beta=0.0)", "tad(alpha=2.0,beta=0.0)"]


def test_embedded_run_streams_rows_and_finishes(migrated_url, tiny_model_dir, tiny_lora_dir, roots, tmp_path):
    settings = make_settings(migrated_url, roots)
    data = write_mc_dataset(tmp_path / "d.jsonl", 10)
    plan = plan_job(_req(tiny_model_dir, tiny_lora_dir, data, shard_size=4), settings)
    seen = []
    info = run_job_embedded(plan.job.id, settings, progress=seen.append)
    assert info.status == "done" and info.samples_done == 10 and info.shards_done == 3
    assert sum(seen) == 10 and seen[0] == 4  # one progress call per batch
    with session_scope(settings) as s:
        runs = store.job_runs(s, plan.job.id)
        assert store.count_sample_rows(s, [r.id for r in runs]) == 10 * len(runs)
        board = {r.key: r for r in store.leaderboard(s, job_ids=[plan.job.id])}
        assert board["ft"].n == 10 and board["ft"].acc is not None and board["ft"].mcnemar_p is None
        assert board["tad(alpha=2.0,beta=0.0)"].mcnemar_p is not None
        # Holm over the job's 3 comparisons with ft, recomputed here from the raw p-values
        raw = sorted((r.mcnemar_p, k) for k, r in board.items() if k != "ft")
        running = 0.0
        for rank, (p, k) in enumerate(raw):
            running = max(running, min(1.0, (3 - rank) * p))
            assert board[k].mcnemar_p_holm == pytest.approx(running)
        assert board["ft"].mcnemar_p_holm is None
        rows = store.sample_rows(s, runs[2].id)
        assert [r["sample_index"] for r in rows] == list(range(10))
        assert all(len(r["scores"]) == 2 + i % 3 for i, r in enumerate(rows))
        assert rows[0]["kv"] and rows[0]["vs_ft"] in (None, "fixed", "broken")
    _assert_aggregates_are_the_reference(settings, [r.id for r in runs], starts={0, 4, 8})
    # a redelivered finished shard is skipped, never recomputed
    assert run_shard(plan.job.id, 0, 4, settings).action == "done"


def test_poisoned_shard_fails_after_cap_and_job_is_partial(sqlite_url, tiny_model_dir, tiny_lora_dir, roots,
                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("TAD_ENABLE_TEST_FAULTS", "1")
    upgrade(sqlite_url)
    settings = make_settings(sqlite_url, roots, max_redeliveries=2)
    data = write_mc_dataset(tmp_path / "d.jsonl", 8, meta={5: {"tad_test_fail_shard": "poisoned sample"}})
    plan = plan_job(_req(tiny_model_dir, tiny_lora_dir, data, shard_size=4, strategies=["ft"]), settings)
    info = run_job_embedded(plan.job.id, settings)
    assert info.status == "partial" and "poisoned sample" in info.error
    with session_scope(settings) as s:
        shards = store.job_shards(s, plan.job.id)
        assert [(x.status, x.attempts) for x in shards] == [("done", 1), ("failed", 2)]
        assert store.count_sample_rows(s, [plan.runs[0].id]) == 4


def test_cancel_at_batch_boundary(sqlite_url, tiny_model_dir, tiny_lora_dir, roots, tmp_path):
    upgrade(sqlite_url)
    settings = make_settings(sqlite_url, roots)
    data = write_mc_dataset(tmp_path / "d.jsonl", 12)
    plan = plan_job(_req(tiny_model_dir, tiny_lora_dir, data, shard_size=8, strategies=["ft"],
                         config={"batch_size": 2}), settings)

    def cancel_after_first_batch(_n: int) -> None:
        with session_scope(settings) as s:
            store.request_cancel(s, plan.job.id)

    info = run_job_embedded(plan.job.id, settings, progress=cancel_after_first_batch)
    assert info.status == "cancelled"
    with session_scope(settings) as s:
        assert [x.status for x in store.job_shards(s, plan.job.id)] == ["cancelled", "cancelled"]
        assert store.count_sample_rows(s, [plan.runs[0].id]) == 2
        assert store.run_aggregates(s, plan.runs[0].id)["n"][2] == 2  # the cancelled shard's rows count


def _assert_aggregates_are_the_reference(settings, run_ids: list[int], starts: set[int]) -> None:
    """The aggregates the shards left (sums of their partials) are those of the Python reference over every
    stored row; each shard stored its partials under its first sample index."""
    from sqlalchemy import delete, select

    from services.db.models import RunAggregate, ShardAggregate

    def table(s) -> dict:
        return {(r, m): (v, se, n) for r, m, v, se, n in s.execute(
            select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n)
            .where(RunAggregate.run_id.in_(run_ids)))}

    with session_scope(settings) as s:
        assert set(s.scalars(select(ShardAggregate.start).distinct())) == starts
        left = table(s)
        s.execute(delete(RunAggregate).where(RunAggregate.run_id.in_(run_ids)))
        store.refresh_aggregates(s, run_ids)
        reference = table(s)
    assert left.keys() == reference.keys() and any(m.startswith("kv.") for _, m in left)
    for key, (v, se, n) in reference.items():
        assert left[key][2] == n, key
        for got, want in ((left[key][0], v), (left[key][1], se)):
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-9, abs=1e-12), key


def test_base_model_licence_is_recorded(migrated_url, tiny_model_dir, tmp_path, capsys):
    """The licence fetched with a model (tad_source.json beside the converted weights) lands in its DB row; a
    registered name without a recorded file falls back to the registry entry."""
    import json
    import shutil

    from tad_core.models import model_licence

    model = tmp_path / "models" / "licensed"
    shutil.copytree(tiny_model_dir, model)
    (model / "tad_source.json").write_text(json.dumps({"licence": "Test Terms", "licence_file": "LICENCE.txt"}))
    settings = make_settings(migrated_url, [tmp_path])
    data = write_mc_dataset(tmp_path / "d.jsonl", 4)
    plan = plan_job(SubmitRequest(dataset=str(data), base=str(model), strategies=["base"]), settings)
    with session_scope(settings) as s:
        assert store.get_base_model(s, plan.job.base_model_id).licence == "Test Terms"
    from services.cli.jobs_cmd import _print_results

    _print_results(settings, plan.job.id)  # the results table names the base model's licence
    assert "Test Terms" in capsys.readouterr().out
    assert model_licence("smollm2-135m-instruct", tmp_path) == "Apache-2.0"
    assert model_licence(str(tiny_model_dir), tiny_model_dir) is None
