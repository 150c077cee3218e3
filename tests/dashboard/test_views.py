"""services.db.views on both dialects (SQLite file and a throw-away Postgres database), on the seeded data."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dashboard.conftest import CORRECT, KEYS, N_MC, Seed, seed_database

TAD1 = "tad(alpha=1.0,beta=0.0)"


@pytest.fixture(params=["sqlite", "postgres"])
def seeded_any(request: pytest.FixtureRequest, tmp_path) -> Seed:  # noqa: ANN001
    from services.db.schema import upgrade

    if request.param == "postgres":
        return request.getfixturevalue("seeded_pg")
    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    return seed_database(url)


@pytest.fixture
def seeded_pg() -> Iterator[Seed]:
    """The seed on a throw-away Postgres database."""
    from services.db.schema import upgrade
    from tests.services.conftest import _pg_available, create_pg_database, drop_pg_database

    if not _pg_available():
        pytest.skip("no Postgres")
    url = create_pg_database()
    try:
        upgrade(url)
        yield seed_database(url)
    finally:
        from services.db.session import dispose_engines

        dispose_engines()
        drop_pg_database(url)


@pytest.fixture
def session(seeded_any: Seed):  # noqa: ANN201
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded_any.url)
    with session_scope(engine) as s:
        yield s
    engine.dispose()


def test_list_runs(session, seeded_any: Seed) -> None:  # noqa: ANN001
    from services.db import views

    rows = views.list_runs(session)
    assert len(rows) == 2 * len(KEYS) + 2 + 2
    assert [r.job_id for r in rows] == sorted((r.job_id for r in rows), reverse=True)
    r = next(r for r in rows if r.run_id == seeded_any.runs[("toy-mc", 1, TAD1)])
    assert (r.dataset, r.split, r.task_type, r.base, r.adapter_label, r.adapter_promoted) == \
        ("toy-mc", "val", "mc", "tiny-base", "qa-lora:1", True)
    assert r.params == {"alpha": 1.0, "beta": 0.0} and r.n == N_MC and r.acc == pytest.approx(0.7)
    only = views.list_runs(session, adapter_name="qa-lora", strategies=["ft"], statuses=["done"])
    assert {(r.dataset, r.adapter_version) for r in only} == {("toy-mc", 1), ("toy-mc", 2), ("toy-gen", 1)}
    assert views.list_runs(session, dataset_id=seeded_any.datasets["toy-gen"], adapter_name="nope") == []


def test_paired_outcomes_match_run_diff(session, seeded_any: Seed) -> None:  # noqa: ANN001
    from services.db import store, views

    a, b = seeded_any.runs[("toy-mc", 1, "ft")], seeded_any.runs[("toy-mc", 2, "ft")]
    pairs = views.paired_outcomes(session, a, b)
    assert [p.sample_index for p in pairs] == list(range(N_MC))
    assert [(p.a_correct, p.b_correct) for p in pairs] == [(CORRECT[(1, "ft")](i), CORRECT[(2, "ft")](i))
                                                          for i in range(N_MC)]
    diff = store.run_diff(session, a, b)
    assert (diff.a_only, diff.b_only) == (sum(p.a_correct and not p.b_correct for p in pairs),
                                          sum(p.b_correct and not p.a_correct for p in pairs))
    # the direction is chosen before the limit: the first 2 broken rows, not the broken among the first 2 rows
    broken = [p.sample_index for p in pairs if p.a_correct and not p.b_correct]
    assert [r.sample_index for r in store.run_diff(session, a, b, limit=2, changes=("broken",)).rows] == broken[:2]
    assert store.run_diff(session, b, a, limit=50, changes=("fixed",)).rows[0].sample_index == broken[0]
    assert store.run_diff(session, a, b, changes=()).rows == []
    # the running job stored only 5 samples of toy-live: pairing is over the intersection
    live = views.list_runs(session, dataset_id=seeded_any.datasets["toy-live"])
    assert views.paired_outcomes(session, live[0].run_id, live[1].run_id) == []


def test_samples_kv_and_single_result(session, seeded_any: Seed) -> None:  # noqa: ANN001
    from services.db import views

    got = views.samples_at(session, seeded_any.datasets["toy-mc"], [3, 1, 99])
    assert sorted(got) == [1, 3] and got[3]["prompt"].startswith("Question 3")
    kv = views.kv_sample_stats(session, seeded_any.runs[("toy-gen", 1, TAD1)])
    assert len(kv) == 6 and all(r.has_steps for r in kv)
    assert kv[0].stats == {"kl_mean": 0.25, "kv_l1_mean": 0.5, "steps": 4.0} and kv[0].flip_rate == 0.25
    mc = views.kv_sample_stats(session, seeded_any.runs[("toy-mc", 1, TAD1)])
    assert not any(r.has_steps for r in mc) and "promoted" not in mc[0].stats
    one = views.sample_result(session, seeded_any.runs[("toy-gen", 1, TAD1)], 2)
    assert one["kv"]["per_step"][1]["flip"] is True and one["output"] == "The answer is 4"
    assert views.sample_result(session, seeded_any.runs[("toy-gen", 1, TAD1)], 99) is None


def test_job_progress_counts_streamed_samples(session, seeded_any: Seed) -> None:  # noqa: ANN001
    from services.db import store, views

    jobs = {j.id: j for j in views.job_progress(session)}
    running = jobs[seeded_any.jobs["running"]]
    # the job row's own counter moves when a shard finishes; the view sums the shards' per-batch progress
    assert store.get_job(session, running.id).samples_done == 0
    assert (running.status, running.samples_done, running.n_samples, running.shards_running) == ("running", 5, 24, 1)
    assert running.active and running.fraction == pytest.approx(5 / 24)
    assert running.model == "tiny-base + qa-lora:2" and running.strategies == ["ft"]
    failed = jobs[seeded_any.jobs["failed"]]
    assert failed.status == "failed" and "boom" in failed.error and not failed.active
    done = jobs[seeded_any.jobs["mc-v1"]]
    assert done.samples_done == N_MC and done.strategies == KEYS
    assert [j.id for j in views.job_progress(session, job_ids=[done.id])] == [done.id]


@pytest.mark.parametrize("page", ["leaderboard", "compare", "sweep", "knowledge", "regression", "jobs", "submit"])
def test_every_page_renders_on_postgres(app_on, seeded_pg: Seed, page: str) -> None:  # noqa: ANN001
    """The same pages on a Postgres database filled by the store functions (JSONB columns, timezone-aware
    timestamps): no exception, no error besides the seeded failed job's."""
    at = app_on(seeded_pg.url, page)
    errors = [e.value for e in at.error]
    if page == "jobs":
        assert errors == [f"job {seeded_pg.jobs['failed']} (failed): could not load the adapter: boom"]
    elif page == "regression":
        assert len(errors) == 1 and "v2 vs v1 on toy-mc:val / ft" in errors[0]
    else:
        assert errors == []
    if page == "leaderboard":
        table = at.dataframe[0].value.set_index(["base", "adapter", "strategy"])
        assert table.loc[("tiny-base", "qa-lora:1", TAD1), "toy-mc:val"].startswith("0.7000 ± ")


def test_live_page_judges_workers_on_the_database_clock(app_on, seeded_pg: Seed) -> None:  # noqa: ANN001
    """A dashboard whose host clock runs ten minutes ahead of the database still shows a worker that beats now as
    alive, seen seconds ago (heartbeats carry the database's time; data.now reads the page's ages on it). Read on
    the host's clock, the worker showed as silent, last seen 10 min ago."""
    from datetime import datetime, timedelta, timezone

    import time_machine

    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded_pg.url)
    with session_scope(engine) as s:
        store.heartbeat(s, "gpu-9:99", 99, seeded_pg.jobs["running"], None)
    engine.dispose()
    with time_machine.travel(datetime.now(timezone.utc) + timedelta(minutes=10), tick=True):
        at = app_on(seeded_pg.url, "jobs")
    workers = at.dataframe[1].value.set_index("worker")
    assert workers.loc["gpu-9:99", "state"] == "alive"
    assert workers.loc["gpu-9:99", "last seen"].endswith(" s ago")
