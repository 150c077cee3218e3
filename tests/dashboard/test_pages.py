"""Each dashboard page through streamlit's AppTest, on a database seeded by the real store functions: the app's
database gate (missing / empty / unreachable) and what each page renders, checked against numbers computed here
independently (tad_core.metrics.mcnemar on the seed's correctness patterns)."""
from __future__ import annotations

import math
import socket
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.dashboard.conftest import CORRECT, N_MC, Seed

TAD1 = "tad(alpha=1.0,beta=0.0)"


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))


def _texts(at) -> str:  # noqa: ANN001
    parts = []
    for kind in ("markdown", "caption", "info", "error", "warning", "success", "title", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Database gate and empty states


def test_missing_database_says_to_upgrade_and_creates_nothing(app_on, tmp_path: Path) -> None:
    db = tmp_path / "nothing" / "tad.db"
    at = app_on(f"sqlite:///{db}")
    assert "No results database yet" in at.info[0].value and "tad db upgrade" in at.info[0].value
    assert not db.exists() and not db.parent.exists()


def test_database_without_schema(app_on, tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    at = app_on(f"sqlite:///{db}")
    assert "has no schema yet: run `tad db upgrade`" in at.info[0].value


def test_unreachable_database_is_a_readable_error_without_the_password(app_on) -> None:
    at = app_on(f"postgresql+psycopg://tad:s3cretpw@127.0.0.1:{_free_port()}/tad")
    assert len(at.error) == 1
    msg = at.error[0].value
    assert "Cannot reach the results database" in msg and "TAD_DATABASE_URL" in msg
    assert "s3cretpw" not in _texts(at)


@pytest.mark.parametrize("page", ["leaderboard", "compare", "sweep", "knowledge"])
def test_no_runs_yet(app_on, tmp_path: Path, page: str) -> None:
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    at = app_on(url, page)
    assert "No runs yet" in at.info[0].value and "make demo" in at.info[0].value


def test_empty_jobs_and_regression_pages(app_on, tmp_path: Path) -> None:
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    assert "No jobs yet" in app_on(url, "jobs").info[0].value
    assert "No registered adapters yet" in app_on(url, "regression").info[0].value


# ---------------------------------------------------------------------------------------------------------------
# Pages on the seeded database


def test_leaderboard_cells_best_marks_and_filters(app_on, seeded: Seed) -> None:
    at = app_on(seeded.url)
    assert at.title[0].value == "Leaderboard"
    table = at.dataframe[0].value.set_index(["base", "adapter", "strategy"])
    # finished jobs by default: the running job on toy-live (5 of 24 samples stored) is left out
    assert list(table.columns) == ["toy-gen:val", "toy-mc:val", "mean"]
    for v in (1, 2):
        for key in ("ft", TAD1, "tad_log(alpha=0.5,beta=0.1)"):
            p = sum(CORRECT[(v, key)](i) for i in range(N_MC)) / N_MC
            cell = table.loc[("tiny-base", f"qa-lora:{v}", key), "toy-mc:val"]
            assert cell.startswith(f"{p:.4f} ± {_se(p, N_MC):.4f} (n={N_MC})"), cell
    # best of toy-mc is 0.7 (tad alpha=1 of both versions): both marked, nothing else
    starred = [idx for idx, cell in table["toy-mc:val"].items() if str(cell).endswith("★")]
    assert sorted(starred) == [("tiny-base", "qa-lora:1", TAD1), ("tiny-base", "qa-lora:2", TAD1)]
    # the seed's 2 wrong generations have no extractable answer: the cell names them
    assert table.loc[("tiny-base", "qa-lora:1", TAD1), "toy-gen:val"] == (
        f"0.6667 ± {_se(4 / 6, 6):.4f} (n=6, 2 unparsed) ★")
    # sorted by mean accuracy, descending
    means = [float(m) for m in at.dataframe[0].value["mean"]]
    assert means == sorted(means, reverse=True)

    at.multiselect(key="lb_strat").set_value(["ft"]).run()
    at.multiselect(key="lb_ds").set_value(["toy-mc:val"]).run()
    table = at.dataframe[0].value
    assert sorted(table["strategy"]) == ["ft", "ft"] and list(table.columns)[-2:] == ["toy-mc:val", "mean"]
    assert table.iloc[0]["toy-mc:val"].startswith("0.5000") and table.iloc[0]["toy-mc:val"].endswith("★")
    assert at.get("download_button")

    at.multiselect(key="lb_family").set_value(["–"]).run()
    assert "No runs match these filters." in at.warning[0].value
    at.multiselect(key="lb_family").set_value([]).run()
    at.multiselect(key="lb_ds").set_value([]).run()
    at.multiselect(key="lb_status").set_value(["done", "running"]).run()
    assert "toy-live:val" in at.dataframe[0].value.columns  # running jobs on request


def test_leaderboard_marks_runs_significantly_different_from_ft(app_on, seeded: Seed) -> None:
    """▲ / ▼ follow the exact McNemar p vs the job's ft, Holm-adjusted over the job's comparisons (recomputed
    here from the seed's correctness patterns); acc_norm has no paired test, so no marks."""
    from tad_core.metrics import mcnemar

    at = app_on(seeded.url)
    table = at.dataframe[0].value.set_index(["base", "adapter", "strategy"])
    marks = set()
    for v in (1, 2):
        ft = [CORRECT[(v, "ft")](i) for i in range(N_MC)]
        tests = {k: mcnemar(ft, [CORRECT[k](i) for i in range(N_MC)]) for k in CORRECT if k[0] == v and k[1] != "ft"}
        order = sorted(tests, key=lambda k: tests[k].p_value)
        running, adjusted = 0.0, {}
        for rank, k in enumerate(order):
            running = max(running, min(1.0, (len(order) - rank) * tests[k].p_value))
            adjusted[k] = running
        for (_, key), res in tests.items():
            want = "" if adjusted[(v, key)] >= 0.05 else ("▲" if res.fixed > res.broken else "▼")
            cell = table.loc[("tiny-base", f"qa-lora:{v}", key), "toy-mc:val"].removesuffix(" ★")
            assert cell.endswith(f"(n={N_MC}) {want}".rstrip()), (v, key, cell, adjusted[(v, key)])
            marks.add(want)
    assert {"", "▲"} <= marks  # the seed has both: v1 nothing significant, v2's weak ft beaten
    assert "significantly better / worse than ft" in _texts(at)
    at.radio(key="lb_metric").set_value("acc_norm").run()
    cells = at.dataframe[0].value["toy-mc:val"].astype(str)
    assert not cells.str.contains("▲|▼").any()


def test_floored_runs_sit_beside_the_literal_ones(app_on, tmp_path: Path) -> None:
    """A job scored with --mc-floor has the same strategy keys as a literal one; leaderboard rows and sweep lines
    name the variant, so neither hides the other (the newest-per-cell rule would otherwise keep one)."""
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope
    from tests.dashboard.conftest import _complete_job, _params, seed_database

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    seed = seed_database(url)
    keys = ["ft", TAD1]
    engine = make_engine(url)
    with session_scope(engine) as s:
        v1 = next(a for a in store.list_adapters(s) if a.version == 1)
        base_id = store.get_job(s, seed.jobs["mc-v1"]).base_model_id
        _complete_job(s, base_id=base_id, adapter_id=v1.id, dataset_id=seed.datasets["toy-mc"], n=N_MC, keys=keys,
                      rows_for=lambda k, i: {"sample_id": f"q{i}", "pred": 0, "correct": i < 15},
                      spec={"base": "tiny-base", "config": {"mc_floor": -1000.0},
                            "strategies": [{"name": k.split("(")[0], "params": _params(k)} for k in keys]})
    engine.dispose()
    at = app_on(url)
    table = at.dataframe[0].value.set_index(["base", "adapter", "strategy"])
    floored = table.loc[("tiny-base", "qa-lora:1", f"{TAD1} [mc_floor=-1000]"), "toy-mc:val"]
    literal = table.loc[("tiny-base", "qa-lora:1", TAD1), "toy-mc:val"]
    assert floored.startswith("0.7500") and literal.startswith(f"{sum(CORRECT[(1, TAD1)](i) for i in range(N_MC)) / N_MC:.4f}")
    from dashboard.views.sweep import sweep_frame
    from services.db import views

    engine = make_engine(url)
    with session_scope(engine) as s:
        rows = [r for r in views.list_runs(s, dataset_id=seed.datasets["toy-mc"]) if r.adapter_version == 1]
    engine.dispose()
    series = set(sweep_frame(rows)[0]["series"])
    assert {"tad (beta=0.0)", "tad (beta=0.0) [mc_floor=-1000]"} <= series


def test_leaderboard_csv_export(seeded: Seed) -> None:
    from dashboard.views.leaderboard import latest_per_cell, long_frame
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rows = store.leaderboard(s, limit=10_000)
    engine.dispose()
    df = latest_per_cell(long_frame(rows))
    row = df[(df.adapter == "qa-lora:2") & (df.strategy == "ft") & (df.dataset == "toy-mc:val")].iloc[0]
    assert row.value == pytest.approx(0.1) and row.n == N_MC and row.run_id == seeded.runs[("toy-mc", 2, "ft")]


def test_comparison_shows_mcnemar_contingency_and_changed_samples(app_on, seeded: Seed) -> None:
    from tad_core.metrics import mcnemar

    at = app_on(seeded.url, "compare")
    at.selectbox(key="cmp_dataset").set_value(seeded.datasets["toy-mc"]).run()
    at.selectbox(key="cmp_a").set_value(seeded.runs[("toy-mc", 1, "ft")]).run()
    at.selectbox(key="cmp_b").set_value(seeded.runs[("toy-mc", 1, TAD1)]).run()
    a = [CORRECT[(1, "ft")](i) for i in range(N_MC)]
    b = [CORRECT[(1, TAD1)](i) for i in range(N_MC)]
    want = mcnemar(a, b)
    assert (want.fixed, want.broken) == (7, 3)
    text = _texts(at)
    assert f"**McNemar p** = {want.p_value:.4g}" in text
    assert f"**Difference** {want.diff:+.4f}, 95% CI [{want.diff_ci_low:+.4f}, {want.diff_ci_high:+.4f}]" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["McNemar p"] == f"{want.p_value:.4g}" and metrics["acc B − A"] == f"{want.diff:+.4f}"
    assert metrics["acc A"] == "0.5000" and metrics["acc B"] == "0.7000"
    table = at.table[0].value
    assert table.loc["A right", "B right"] == want.both_right and table.loc["A wrong", "B right"] == want.fixed
    assert table.loc["A right", "B wrong"] == want.broken and table.loc["A wrong", "B wrong"] == want.both_wrong

    changed = at.dataframe[0].value
    assert sorted(changed["sample"]) == [1, 3, 5, 7, 9, 11, 13, 14, 16, 18]
    at.radio(key="cmp_filter").set_value("fixed (A wrong, B right)").run()
    fixed = at.dataframe[0].value
    assert list(fixed["sample"]) == [1, 3, 5, 7, 9, 11, 13] and set(fixed["change"]) == {"fixed"}
    row = fixed.iloc[0]  # sample 1: gold answer 1 ("green"); ft picked (1 + 1) % 3 = 2, tad the gold one
    assert row["prompt"] == "Question 1: which colour is item 1? Answer:"
    assert row["gold"] == "1: green" and row["B answer"] == "1: green" and row["A answer"] == "2: blue"
    at.radio(key="cmp_filter").set_value("broken (A right, B wrong)").run()
    assert list(at.dataframe[0].value["sample"]) == [14, 16, 18]


def test_alpha_sweep_points_and_ft_line(app_on, seeded: Seed) -> None:
    at = app_on(seeded.url, "sweep")
    at.selectbox(key="sw_dataset").set_value(seeded.datasets["toy-mc"]).run()
    at.selectbox(key="sw_model").set_value("tiny-base + qa-lora:1").run()
    df = at.dataframe[0].value
    tad = df[df.series == "tad (beta=0.0)"]
    assert list(tad.alpha) == [0.5, 1.0, 2.0]
    assert list(tad.acc.round(4)) == [0.6, 0.7, 0.6]
    assert list(tad.stderr.round(6)) == [round(_se(p, N_MC), 6) for p in (0.6, 0.7, 0.6)]
    assert list(df[df.series == "tad_log (beta=0.1)"].acc.round(4)) == [0.65]
    caption = _texts(at)
    assert f"ft = 0.5000 (run {seeded.runs[('toy-mc', 1, 'ft')]})" in caption
    assert "Best: tad (beta=0.0) at alpha=1 (0.7000)" in caption
    assert at.get("vega_lite_chart")


def test_alpha_sweep_keeps_to_one_slice_of_finished_runs(seeded: Seed) -> None:
    """A later job on 5 samples (newest first in the list) no longer mixes its points and its ft line into the
    20-sample sweep, and a running job's runs are left out."""
    from dataclasses import replace

    from dashboard.views.sweep import sweep_frame
    from services.db import views
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rows = [r for r in views.list_runs(s, adapter_name="qa-lora") if r.dataset == "toy-mc"
                and r.adapter_version == 1]
    engine.dispose()
    ft = next(r for r in rows if r.strategy == "ft")
    tad1 = next(r for r in rows if r.key == TAD1)
    later = [replace(ft, run_id=20_001, job_id=9_001, n=5, acc=1.0),
             replace(tad1, run_id=20_002, job_id=9_001, n=5, acc=0.2)]
    running = [replace(tad1, run_id=20_003, job_id=9_002, job_status="running", acc=0.0)]
    df, ft_row = sweep_frame([*running, *later, *rows])
    assert ft_row is not None and ft_row.run_id == 20_001 and set(df.n) == {5}  # the newest slice, whole
    df, ft_row = sweep_frame([*running, *rows])
    assert ft_row.run_id == ft.run_id and set(df.n) == {N_MC} and 20_003 not in set(df.run_id)


def test_knowledge_vector_distributions_and_token_view(app_on, seeded: Seed) -> None:
    at = app_on(seeded.url, "knowledge")
    at.selectbox(key="kv_dataset").set_value(seeded.datasets["toy-gen"]).run()
    at.selectbox(key="kv_run").set_value(seeded.runs[("toy-gen", 1, TAD1)]).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"mean kl_mean": "0.2500", "mean kv_l1_mean": "0.5000", "mean flip_rate": "0.2500"}
    assert len(at.get("vega_lite_chart")) == 3
    at.selectbox(key="kv_sample").set_value(3).run()
    html = at.get("html")[0].value
    assert html.count("<span") == 4 and "⟨100⟩" in html and "⟨103⟩" in html
    at.slider(key="kv_step").set_value(2).run()
    promoted, demoted = at.dataframe[0].value, at.dataframe[1].value
    assert list(promoted["token"]) == ["'up2a'", "'up2b'"] and list(demoted["id"]) == [302, 312]
    assert "**Step 2**" in _texts(at) and "KL 0.33" in _texts(at)  # 0.1 * 3 + 0.01 * sample 3
    at.radio(key="kv_by").set_value("flip").run()
    html = at.get("html")[0].value
    assert html.count("rgba(255, 75, 75, 0.88)") == 1  # only step 1 flipped

    # multiple choice: one vector per sample, its top tokens
    at.selectbox(key="kv_dataset").set_value(seeded.datasets["toy-mc"]).run()
    assert "No per-step statistics" in at.info[0].value
    assert list(at.dataframe[0].value["token"]) == ["'Paris'"]


def test_live_jobs_progress_heartbeats_and_errors(app_on, seeded: Seed) -> None:
    from services.db import store
    from services.db.session import make_engine, session_scope

    from services.db import users
    from services.db.models import Job

    engine = make_engine(seeded.url)
    with session_scope(engine) as s:  # the worker's periodic heartbeat (the seed may be older than 3 periods)
        store.heartbeat(s, "gpu-1:4242", 4242, seeded.jobs["running"], None)
        owner = users.add_user(s, f"alice{seeded.jobs['running']}")  # as if submitted through the API
        s.get(Job, seeded.jobs["running"]).owner_id = owner.id
    engine.dispose()
    at = app_on(seeded.url, "jobs")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["running"] == "1" and metrics["failed"] == "1" and metrics["done"] == "3"
    assert at.get("progress")[0].value == 20  # 5 of 24 samples stored (percent)
    jobs = at.dataframe[0].value.set_index("job")
    running = jobs.loc[seeded.jobs["running"]]
    assert running["samples"] == "5/24" and running["progress"] == pytest.approx(5 / 24)
    assert running["shards"] == "0 done, 1 running, 0 failed / 3"
    assert running["owner"] == owner.name and jobs.loc[seeded.jobs["failed"]]["owner"] == "-"
    assert f"job {seeded.jobs['failed']} (failed): could not load the adapter: boom" in at.error[0].value
    workers = at.dataframe[1].value
    assert list(workers["worker"]) == ["gpu-1:4242"] and list(workers["state"]) == ["alive"]
    assert "refreshing every 2 s while jobs run" in _texts(at)
    at.selectbox(key="jobs_detail").set_value(seeded.jobs["running"]).run()
    shards = at.dataframe[2].value
    assert list(shards["status"]) == ["running", "queued", "queued"] and shards.iloc[0]["done"] == "5/8"


def _job_state(url: str, job_id: int) -> tuple[str, bool, list[str]]:
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    with session_scope(engine) as s:
        job = store.get_job(s, job_id)
        state = job.status, job.cancel_requested, [sh.status for sh in store.job_shards(s, job_id)]
    engine.dispose()
    return state


def test_live_progress_text_shows_names_literally(app_on, tmp_path: Path) -> None:
    """A dataset's name (a file stem as given) went into the progress bar's Markdown unescaped: links, images and
    colour directives rendered."""
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        base = store.get_or_create_base_model(s, "tiny-base", "/models/tiny-base")
        ds, _ = store.register_dataset(s, name="[click](https://evil.example)", split="val", content_hash="h",
                                       task_type="mc", source="x", samples=[
                                           {"id": "a", "prompt": "q", "choices": ["x", "y"], "answer": 0}])
        store.create_job(s, spec={"base": "tiny-base"}, submitted_by="x", base_model_id=base.id, adapter_id=None,
                         dataset_id=ds.id, n_samples=1, runs=[store.RunSpec("ft", {}, "ft", "h")],
                         shard_ranges=[(0, 1)])
    engine.dispose()
    text = app_on(url, "jobs").get("progress")[0].proto.text
    assert r"\[click\](https://evil.example)" in text, text


def test_cancel_button_needs_the_token_then_stops_the_job(app_on, tmp_path: Path) -> None:
    from services.db.schema import upgrade
    from tests.dashboard.conftest import seed_database

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    seed = seed_database(url)  # own copy: this test changes the running job
    running = seed.jobs["running"]
    at = app_on(url, "jobs", TAD_SUBMIT_TOKEN="right-token")
    at.selectbox(key="jobs_detail").set_value(running).run()
    at.text_input(key="cancel_token").set_value("wrong-token")
    at.button(key="cancel_job").click().run()
    assert f"job {running} not cancelled: submit token rejected" in at.error[-1].value
    assert _job_state(url, running) == ("running", False, ["running", "queued", "queued"])

    at.text_input(key="cancel_token").set_value("right-token")
    at.button(key="cancel_job").click().run()
    assert f"job {running}: running (running shards stop at their next batch)" in at.success[0].value
    assert _job_state(url, running) == ("running", True, ["running", "cancelled", "cancelled"])
    # a finished job offers no cancel button
    at.selectbox(key="jobs_detail").set_value(seed.jobs["failed"]).run()
    assert not [b for b in at.button if b.key == "cancel_job"]


def test_regression_view_flags_the_worse_version(app_on, seeded: Seed) -> None:
    from tad_core.metrics import mcnemar

    at = app_on(seeded.url, "regression")
    want = mcnemar([CORRECT[(1, "ft")](i) for i in range(N_MC)], [CORRECT[(2, "ft")](i) for i in range(N_MC)])
    assert want.broken == 8 and want.fixed == 0
    assert f"v2 vs v1 on toy-mc:val / ft: {want.diff:+.4f} (p={want.p_value:.3g})" in at.error[0].value
    versions = at.dataframe[0].value
    assert list(versions["version"]) == [1, 2] and list(versions["promoted"]) == ["★", ""]
    mc = next(d.value for d in at.dataframe if "verdict" in d.value.columns and len(d.value) == 10)
    v2 = mc[mc.version == 2].set_index("strategy")
    assert v2.loc["ft", "verdict"] == "regressed" and v2.loc["ft", "p_value"] == pytest.approx(want.p_value)
    assert (v2.drop(index="ft")["verdict"] == "unchanged").all()
    assert set(mc[mc.version == 1]["verdict"]) == {"baseline"}
    at.number_input(key="rg_alpha").set_value(0.005).run()
    assert "No regression at significance 0.005" in at.success[0].value
    at.radio(key="rg_against").set_value("previous").run()
    at.number_input(key="rg_alpha").set_value(0.05).run()
    assert "v2 vs v1 on toy-mc:val / ft" in at.error[0].value


def test_regression_page_with_unfinished_runs_and_one_sided_failures(app_on, tmp_path: Path) -> None:
    """A family whose only job has not finished showed a KeyError on the Regressions page; and samples that failed
    on one side only (left out of the pairs) gave a verdict the gate refuses to give."""
    from services.db import store
    from services.db.session import make_engine, session_scope
    from services.db.schema import upgrade
    from services.result_rows import error_rows
    from tests.dashboard.conftest import seed_database

    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    seed = seed_database(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        base = store.get_or_create_base_model(s, "tiny-base", "/models/tiny-base")
        solo, _ = store.register_adapter(s, name="solo", path="/adapters/solo", method="lora", sha256="5" * 64,
                                         base_model_id=base.id)
        store.create_job(s, spec={"base": "tiny-base", "adapter_label": "solo:1"}, submitted_by="x",
                         base_model_id=base.id, adapter_id=solo.id, dataset_id=seed.datasets["toy-mc"],
                         n_samples=N_MC, runs=[store.RunSpec("ft", {}, "ft", "h-solo")], shard_ranges=[(0, N_MC)])
        v2_ft = next(r for r in store.leaderboard(s) if r.adapter == "qa-lora:2" and r.label == "ft"
                     and r.dataset == "toy-mc")
        store.upsert_sample_results(s, error_rows(0, "q0", {"ft": v2_ft.run_id}, "RuntimeError: boom"))
    engine.dispose()
    at = app_on(url, "regression")
    at.selectbox(key="rg_family").set_value("solo").run()
    assert not at.exception and "No finished runs of solo yet" in at.info[0].value
    at.selectbox(key="rg_family").set_value("qa-lora").run()
    mc = next(d.value for d in at.dataframe if "verdict" in d.value.columns and len(d.value) == 10)
    assert mc[(mc.version == 2) & (mc.strategy == "ft")]["verdict"].tolist() == ["errors"]


def test_regression_verdicts_previous_version_and_min_effect(seeded: Seed) -> None:
    from dashboard.views.regression import verdicts
    from services.db import views
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rows = views.list_runs(s, adapter_name="qa-lora")
        paired = {(a.run_id, b.run_id): views.paired_outcomes(s, a.run_id, b.run_id) for a in rows for b in rows}
    engine.dispose()
    found = verdicts(rows, lambda a, b: paired[(a, b)], against="previous", alpha=0.05, min_effect=0.5)
    ft2 = next(v for v in found if v.dataset == "toy-mc:val" and v.strategy == "ft" and v.version == 2)
    assert ft2.verdict == "unchanged" and ft2.diff == pytest.approx(-0.4)  # significant, but below the min effect
    assert next(v for v in found if v.strategy == "ft" and v.version == 1 and v.dataset == "toy-mc:val").verdict \
        == "baseline"
    # one rule for `tad regress`, its JSON and this page: services.regress.verdict, also at the effect boundary
    from services.regress import verdict

    for min_effect in (0.0, 0.1, 0.4, abs(ft2.diff), 0.5):
        for v in verdicts(rows, lambda a, b: paired[(a, b)], against="previous", alpha=0.05, min_effect=min_effect):
            if v.diff is not None:
                assert v.verdict == verdict(v.diff, v.p_value, 0.05, min_effect), (v, min_effect)
    at_boundary = verdicts(rows, lambda a, b: paired[(a, b)], against="previous", min_effect=abs(ft2.diff))
    assert next(v for v in at_boundary if v.run_id == ft2.run_id).verdict == "unchanged"  # strict, as the CLI


def test_regression_trend_reads_finished_runs_on_the_same_slice(seeded: Seed) -> None:
    """A running job's partial run (listed first, newest) no longer stands for its version, and runs of another
    sample count (`--limit`) form their own group instead of being compared with the full runs."""
    from dataclasses import replace

    from dashboard.views.regression import latest_per_version
    from services.db import views
    from services.db.session import make_engine, session_scope

    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rows = views.list_runs(s, adapter_name="qa-lora")
    engine.dispose()
    done = next(r for r in rows if r.label == "ft" and r.adapter_version == 2 and r.dataset == "toy-mc")
    partial = replace(done, run_id=10_001, job_status="running", n=done.n, acc=0.0)
    limited = replace(done, run_id=10_002, n=5, acc=1.0)
    groups = latest_per_version([partial, limited, *rows])
    assert groups[(done.dataset_id, "ft", done.n)][2].run_id == done.run_id
    assert groups[(done.dataset_id, "ft", 5)] == {2: limited}


# ---------------------------------------------------------------------------------------------------------------
# Submission


def _jobs_count(url: str) -> int:
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    with session_scope(engine) as s:
        n = len(store.list_jobs(s, limit=1000))
    engine.dispose()
    return n


@pytest.fixture
def fresh_url(tmp_path: Path) -> str:
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    return url


def _mc_jsonl(path: Path, n: int = 6) -> Path:
    import json

    from tests.dashboard.conftest import mc_sample

    path.write_text("".join(json.dumps(mc_sample(i)) + "\n" for i in range(n)))
    return path


def _submit_button(at):  # noqa: ANN001, ANN202
    return next(b for b in at.button if b.label == "Submit")


def test_submit_rejects_bad_strategy_and_stores_nothing(app_on, fresh_url: str, tmp_path: Path) -> None:
    data = _mc_jsonl(tmp_path / "toy.jsonl")
    at = app_on(fresh_url, "submit")
    at.radio(key="sub_source").set_value("server file")
    at.text_input(key="sub_path").set_value(str(data))
    at.text_area(key="sub_strategies").set_value("ft\nwarp:speed=9\ntad:alpha=-1")
    _submit_button(at).click().run()
    msg = at.error[0].value
    assert msg.startswith("Submission rejected, nothing was stored")
    assert "unknown strategy 'warp'" in msg and "alpha" in msg
    assert _jobs_count(fresh_url) == 0


def test_submit_requires_the_token_when_configured(app_on, fresh_url: str, tmp_path: Path) -> None:
    data = _mc_jsonl(tmp_path / "toy.jsonl")
    at = app_on(fresh_url, "submit", TAD_SUBMIT_TOKEN="right-token")
    at.radio(key="sub_source").set_value("server file")
    at.text_input(key="sub_path").set_value(str(data))
    at.text_input(key="sub_token").set_value("wrong-token")
    _submit_button(at).click().run()
    assert "Submission refused, nothing was stored: submit token rejected" in at.error[0].value
    assert "right-token" not in _texts(at)
    assert _jobs_count(fresh_url) == 0


def test_submit_invalid_upload_lists_errors_and_writes_nothing(app_on, fresh_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    at = app_on(fresh_url, "submit", TAD_CACHE_DIR=str(cache))
    at.radio(key="sub_source").set_value("upload")
    bad = b'{"id": "a", "prompt": "x", "choices": ["p", "q"], "answer": 5}\nnot json\n'
    at.file_uploader(key="sub_upload").set_value(("bad.jsonl", bad, "application/jsonl"))
    _submit_button(at).click().run()
    msg = at.error[0].value
    assert "the uploaded dataset is invalid" in msg and "line 2" in msg and "line 1" in msg
    assert not (cache / "uploads").exists()
    assert _jobs_count(fresh_url) == 0


def test_submit_upload_runs_embedded_job_to_completion(app_on, fresh_url: str, tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    """A valid upload on the tiny model, executed in the dashboard process: the job lands in the DB and finishes,
    and the leaderboard shows it."""
    import time

    from services.db import store
    from services.db.session import make_engine, session_scope

    content = _mc_jsonl(tmp_path / "up.jsonl", n=5).read_bytes()
    at = app_on(fresh_url, "submit", TAD_CACHE_DIR=str(tmp_path / "cache"),
                TAD_MODEL_ROOTS=f"{tiny_model_dir.parent.parent}:{tmp_path}")
    at.radio(key="sub_source").set_value("upload")
    at.file_uploader(key="sub_upload").set_value(("my eval.jsonl", content, "application/jsonl"))
    at.text_input(key="sub_base").set_value(str(tiny_model_dir))
    at.text_area(key="sub_strategies").set_value("ft\nbase")
    at.number_input(key="sub_batch").set_value(4)
    at.radio(key="sub_mode").set_value("embedded")
    _submit_button(at).click().run()
    assert not at.error, [e.value for e in at.error]
    assert "5 samples × 2 strategies" in at.success[0].value and "running in the dashboard process" in \
        at.success[0].value
    saved = list((tmp_path / "cache" / "uploads").glob("*/my_eval.jsonl"))
    assert len(saved) == 1 and saved[0].read_bytes() == content

    engine = make_engine(fresh_url)
    deadline = time.monotonic() + 240
    while True:
        with session_scope(engine) as s:
            job = store.list_jobs(s)[0]
        if job.finished or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    with session_scope(engine) as s:
        board = store.leaderboard(s, job_ids=[job.id])
    engine.dispose()
    assert job.status == "done" and job.samples_done == 5, job
    assert job.spec["dataset"] == "my_eval" and {r.key for r in board} == {"ft", "base"}
    engine = make_engine(fresh_url)
    with session_scope(engine) as s:
        assert store.get_dataset(s, job.dataset_id).source == "upload:my eval.jsonl"  # not the saved copy's path
    engine.dispose()
    lb = app_on(fresh_url)
    assert "my_eval:val" in lb.dataframe[0].value.columns
