"""Regression gates on the tiny model: adapter registry, suites, `tad regress` statistics, reuse and exit codes.

The statistics of every gate row are recomputed here from the stored per-sample results (tad_core.metrics.mcnemar
and scipy's binomial test), not read back from the gate. The real-model tests (two LoRA adapters trained on
SmolLM2) are in test_regress_smollm2.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from services.cli.main import app
from services.db import store
from services.db.session import session_scope
from services.regress import verdict
from services.settings import Settings, get_settings
from services.suites import SuiteError, parse_suite
from tad_core.metrics import mcnemar
from tests.conftest import build_adapter
from tests.services.helpers import write_mc_dataset

runner = CliRunner()

SUITE = """\
name: smoke
version: 1
datasets:
  - {dataset: mc.jsonl, split: val, limit: 20}
  - {dataset: mc.jsonl, split: val, limit: 8}
strategies: [ft, "tad:alpha=1"]
config: {batch_size: 5}
"""


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny_lora2") / "lora2", "lora", seed=2)


def _use_env(monkeypatch: pytest.MonkeyPatch, db: str, roots: list[Path], **extra: str) -> Settings:
    monkeypatch.setenv("TAD_DATABASE_URL", db)
    monkeypatch.setenv("TAD_MODEL_ROOTS", ":".join(str(r) for r in roots))
    monkeypatch.delenv("TAD_SUBMIT_TOKEN", raising=False)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    return Settings()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path,
        second_lora: Path) -> dict:
    settings = _use_env(monkeypatch, f"sqlite:///{tmp_path / 'gate.db'}", [tiny_model_dir.parent.parent, tmp_path,
                                                                           second_lora.parent])
    write_mc_dataset(tmp_path / "mc.jsonl", 24)
    (tmp_path / "suite.yaml").write_text(SUITE)
    yield {"settings": settings, "tmp": tmp_path, "model": str(tiny_model_dir), "a1": str(tiny_lora_dir),
           "a2": str(second_lora), "suite": str(tmp_path / "suite.yaml")}
    get_settings.cache_clear()


def _ok(argv: list[str], code: int = 0) -> str:
    r = runner.invoke(app, argv)
    assert r.exit_code == code, (argv, r.output)
    assert "Traceback" not in r.output
    return r.output


def _gate(argv: list[str]) -> tuple[int, dict]:
    r = runner.invoke(app, ["regress", *argv, "--json"])
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout.strip().splitlines()[-1])


def _setup_family(env: dict) -> None:
    _ok(["adapters", "register", "fam", env["a1"], "--base", env["model"]])
    _ok(["adapters", "promote", "fam:1"])
    _ok(["adapters", "register", "fam", env["a2"], "--base", env["model"]])
    _ok(["suites", "add", env["suite"]])


def _holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment, written out here independently of tad_core.metrics.holm."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _check_rows_independently(settings: Settings, payload: dict) -> None:
    """Every row's statistics, recomputed from the stored per-sample rows of the two runs it names: the exact
    McNemar p, its Holm adjustment over the check's rows, the exact interval that agrees with p, the verdict."""
    assert payload["rows"]
    alpha, eff = payload["alpha"], payload["min_effect"]
    raw = []
    with session_scope(settings) as s:
        for row in payload["rows"]:
            base = {r["sample_index"]: r["correct"] for r in store.sample_rows(s, row["baseline_run_id"])}
            cand = {r["sample_index"]: r["correct"] for r in store.sample_rows(s, row["candidate_run_id"])}
            assert set(base) == set(cand) and len(base) == row["n"] == (row["limit"] or len(base))
            idx = sorted(base)
            a, b = [bool(base[i]) for i in idx], [bool(cand[i]) for i in idx]
            res = mcnemar(a, b)
            fixed = sum(1 for x, y in zip(a, b) if not x and y)
            broken = sum(1 for x, y in zip(a, b) if x and not y)
            p = 1.0 if fixed + broken == 0 else binomtest(fixed, fixed + broken, 0.5).pvalue
            assert (row["fixed"], row["broken"]) == (fixed, broken)
            assert row["p_value"] == pytest.approx(p) == pytest.approx(res.p_value)
            assert row["baseline_acc"] == pytest.approx(sum(a) / len(a))
            assert row["candidate_acc"] == pytest.approx(sum(b) / len(b))
            assert row["diff"] == pytest.approx((sum(b) - sum(a)) / len(a))
            m = fixed + broken
            if m:
                ci = binomtest(fixed, m, 0.5).proportion_ci(confidence_level=1 - alpha, method="exact")
                assert (row["ci_low"], row["ci_high"]) == pytest.approx((m / len(a) * (2 * ci.low - 1),
                                                                         m / len(a) * (2 * ci.high - 1)))
            assert row["ci_low"] <= row["diff"] <= row["ci_high"]
            assert (row["ci_low"] > 0 or row["ci_high"] < 0) == (p < alpha)  # the interval agrees with the test
            raw.append(p)
    for row, adj in zip(payload["rows"], _holm(raw)):
        assert row["p_holm"] == pytest.approx(adj)
        want = ("regressed" if adj < alpha and row["diff"] < -eff else
                "improved" if adj < alpha and row["diff"] > eff else "unchanged")
        assert row["verdict"] == want
    assert payload["exit_code"] == (1 if any(r["verdict"] == "regressed" for r in payload["rows"]) else 0)


def test_verdict_rule() -> None:
    assert verdict(-0.10, 0.01, 0.05, 0.01) == "regressed"
    assert verdict(+0.10, 0.01, 0.05, 0.01) == "improved"
    assert verdict(-0.10, 0.06, 0.05, 0.01) == "unchanged"  # not significant
    assert verdict(-0.005, 0.001, 0.05, 0.01) == "unchanged"  # below the minimum effect
    assert verdict(-0.01, 0.001, 0.05, 0.01) == "unchanged"  # the boundary is not a regression
    assert verdict(0.0, 1.0, 1.0, 0.0) == "unchanged"


def test_suite_validation_names_each_field(tmp_path: Path) -> None:
    bad = {"name": "a:b", "version": 0, "colour": "red",
           "datasets": [{"dataset": "arc_easy", "split": "nope"}, {"dataset": "arc_easy", "limit": -1},
                        {"dataset": str(tmp_path / "missing.jsonl")}, {"dataset": "arc_easy", "splt": "val"}],
           "strategies": ["tad:alpha=oops", "nosuch"], "config": {"batch_size": 0, "bogus": 1}}
    with pytest.raises(SuiteError) as err:
        parse_suite(bad)
    text = "\n".join(err.value.errors)
    for needle in ("unknown field(s) colour", "name:", "version:", "datasets[0].split: dataset 'arc_easy' has no "
                   "split 'nope'", "datasets[1].limit", "datasets[2].dataset", "datasets[3]: unknown field(s) splt",
                   "strategies[1]: unknown strategy 'nosuch'", "config:"):
        assert needle in text, (needle, text)
    with pytest.raises(SuiteError, match="strategies: required"):
        parse_suite({"name": "x", "version": 1, "datasets": ["arc_easy"]})
    ok = parse_suite({"name": "x", "version": 2, "datasets": ["arc_easy"], "strategies": "ft"})
    assert ok.datasets[0].split == "val" and ok.datasets[0].limit is None and ok.strategies == ("ft",)


def test_suites_cli(env: dict) -> None:
    assert "added suite smoke:1: 2 dataset(s) x 2 strategy spec(s)" in _ok(["suites", "add", env["suite"]])
    assert "already stored with this definition" in _ok(["suites", "add", env["suite"]])
    listed = json.loads(_ok(["suites", "list", "--json"]))
    assert [(x["name"], x["version"]) for x in listed] == [("smoke", 1)]
    assert listed[0]["spec"]["datasets"][0]["dataset"] == str(env["tmp"] / "mc.jsonl")  # resolved next to the file
    changed = env["tmp"] / "changed.yaml"
    changed.write_text(SUITE.replace("limit: 20", "limit: 21"))
    assert "already exists with another definition" in _ok(["suites", "add", str(changed)], 2)
    broken = env["tmp"] / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert "not valid YAML" in _ok(["suites", "add", str(broken)], 2)
    broken.write_text(SUITE.replace("limit: 8", "limit: eight"))
    out = _ok(["suites", "add", str(broken)], 2)
    assert "datasets[1].limit: must be a positive integer" in out and "nothing was stored" in out
    assert "cannot read suite file" in _ok(["suites", "add", str(env["tmp"] / "none.yaml")], 2)


def test_adapter_registry_cli(env: dict) -> None:
    out = _ok(["adapters", "register", "fam", env["a1"], "--base", env["model"]])
    assert "registered fam:1: lora, sha256" in out
    assert "already has these weights" in _ok(["adapters", "register", "fam", env["a1"], "--base", env["model"]])
    assert "registered fam:2" in _ok(["adapters", "register", "fam", env["a2"], "--base", env["model"]])
    copy = env["tmp"] / "copy_of_a1"
    shutil.copytree(env["a1"], copy)
    out = _ok(["adapters", "register", "fam", str(copy), "--base", env["model"], "--version", "5"])
    assert "registered fam:5" in out and "same weights are registered as fam:1" in out
    assert "already exists with other weights" in _ok(["adapters", "register", "fam", str(copy), "--base",
                                                       env["model"], "--version", "2"], 2)
    assert "promoted fam:2" in _ok(["adapters", "promote", "fam:2"])
    listed = json.loads(_ok(["adapters", "list", "--json"]))
    assert [(a["version"], a["promoted"]) for a in listed] == [(1, False), (2, True), (5, False)]
    assert "fam:2" in _ok(["adapters", "list"])

    # the base an adapter belongs to is checked without loading weights
    out = _ok(["adapters", "register", "other", env["a1"], "--base", "smollm2-135m-instruct"], 2)
    assert "does not fit base model 'smollm2-135m-instruct'" in out
    trained = env["tmp"] / "trained"
    shutil.copytree(env["a1"], trained)
    (trained / "tad_manifest.json").write_text(json.dumps({"base": "gemma3-270m"}))
    assert "was trained on base model 'gemma3-270m'" in _ok(["adapters", "register", "other", str(trained), "--base",
                                                            env["model"]], 2)
    assert "no adapter_config.json" in _ok(["adapters", "register", "other", str(env["tmp"]), "--base",
                                            env["model"]], 2)
    assert "outside the allowed model roots" in _ok(["adapters", "register", "other", "/etc", "--base",
                                                     env["model"]], 2)
    assert "adapter name 'a:b'" in _ok(["adapters", "register", "a:b", env["a1"], "--base", env["model"]], 2)
    assert "adapter fam:9 does not exist" in _ok(["adapters", "promote", "fam:9"], 2)
    assert "give the version" in _ok(["adapters", "promote", "fam"], 2)


def test_gate_statistics_reuse_and_force(env: dict) -> None:
    _setup_family(env)
    code, first = _gate(["fam:2", "--suite", "smoke"])
    assert first["candidate"] == "fam:2" and first["baseline"] == "fam:1" and first["suite"] == "smoke:1"
    assert len(first["jobs_run"]) == 4  # one job per (adapter, dataset)
    assert {(r["dataset"], r["limit"], r["strategy"]) for r in first["rows"]} == {
        ("mc", lim, key) for lim in (20, 8) for key in ("ft", "tad(alpha=1.0,beta=0.0)")}
    assert code == first["exit_code"]
    _check_rows_independently(env["settings"], first)
    with session_scope(env["settings"]) as s:
        checks = store.regression_checks(s, "fam")
        assert [(c.candidate, c.baseline, c.suite) for c in checks] == [("fam:2", "fam:1", "smoke:1")]
        assert checks[0].rows == first["rows"]
        n_jobs, n_rows = len(store.list_jobs(s)), store.count_sample_rows(s, list(range(1, 100)))
    assert n_rows == 2 * 2 * (20 + 8)

    code2, again = _gate(["fam:2", "--suite", "smoke:1"])  # identical request: everything reused
    assert again["jobs_run"] == [] and again["rows"] == [
        {**r, "baseline_reused": True, "candidate_reused": True} for r in first["rows"]]
    with session_scope(env["settings"]) as s:
        assert len(store.list_jobs(s)) == n_jobs and store.count_sample_rows(s, list(range(1, 100))) == n_rows

    code3, forced = _gate(["fam:2", "--suite", "smoke", "--force"])
    assert len(forced["jobs_run"]) == 4
    assert {r["candidate_run_id"] for r in forced["rows"]}.isdisjoint({r["candidate_run_id"] for r in first["rows"]})
    strip = lambda rows: [{k: v for k, v in r.items() if "run_id" not in k and "reused" not in k} for r in rows]  # noqa: E731
    assert strip(forced["rows"]) == strip(first["rows"])  # recomputed, same numbers
    assert code == code2 == code3

    out = _ok(["regress", "fam:2", "--suite", "smoke"], code)  # the human table
    assert "baseline acc" in out and "McNemar p" in out and ("PASSED" in out or "REGRESSED" in out)


def test_suite_with_the_baselines_gates_dola_and_svdecode(env: dict) -> None:
    """A suite can include the two baselines: dola, and svdecode calibrated per adapter on the dataset's train
    split (each adapter's run records the mu it used), with the gate's statistics as for any strategy."""
    suite = env["tmp"] / "baselines.yaml"
    suite.write_text("name: baselines\nversion: 1\ndatasets:\n  - {dataset: arc_easy, split: val, limit: 8}\n"
                     "strategies: [ft, dola, svdecode]\nconfig: {batch_size: 4}\n")
    _setup_family(env)
    _ok(["suites", "add", str(suite)])
    code, payload = _gate(["fam:2", "--suite", "baselines"])
    assert {r["strategy"] for r in payload["rows"]} == {"ft", "dola(layers=high,repetition_penalty=1.2)",
                                                        "svdecode(beta=0.1,mu=auto)"}
    _check_rows_independently(env["settings"], payload)
    with session_scope(env["settings"]) as s:
        info = {r.run_id: r.info for r in store.leaderboard(s)}
    (row,) = [r for r in payload["rows"] if r["strategy"].startswith("svdecode")]
    sv = [info[row["baseline_run_id"]], info[row["candidate_run_id"]]]
    assert all(i["calibration_dataset"] == "arc_easy:train" and i["calibration_n_samples"] == 128 for i in sv)
    assert sv[0]["calibration"] != sv[1]["calibration"]  # one calibration per adapter


def test_gate_is_a_mirror_and_can_fail(env: dict) -> None:
    """With --alpha 1 --min-effect 0 any observed drop fails the gate: of fam:2 vs fam:1 and fam:1 vs fam:2 at
    least one must exit 1 (the two adapters do not score identically), and each row is the other's mirror."""
    _setup_family(env)
    loose = ["--suite", "smoke", "--alpha", "1", "--min-effect", "0"]
    code_fwd, fwd = _gate(["fam:2", *loose])
    code_rev, rev = _gate(["fam:1", "--against", "fam:2", *loose])
    assert rev["jobs_run"] == []  # the reverse comparison reuses every run
    _check_rows_independently(env["settings"], fwd)
    _check_rows_independently(env["settings"], rev)
    for f, r in zip(fwd["rows"], rev["rows"]):
        assert r["diff"] == pytest.approx(-f["diff"]) and r["p_value"] == pytest.approx(f["p_value"])
        assert (r["fixed"], r["broken"]) == (f["broken"], f["fixed"])
    assert any(r["diff"] != 0 for r in fwd["rows"])
    assert 1 in (code_fwd, code_rev)
    out = _ok(["regress", "fam:1", "--against", "fam:2", *loose], code_rev)
    assert ("REGRESSED" in out) == (code_rev == 1)


def test_identical_weights_are_unchanged_and_computed_once(env: dict) -> None:
    _setup_family(env)
    copy = env["tmp"] / "same_weights"
    shutil.copytree(env["a1"], copy)
    _ok(["adapters", "register", "fam", str(copy), "--base", env["model"], "--version", "3"])
    code, first = _gate(["fam:3", "--suite", "smoke"])  # nothing stored yet: computed once, for both sides
    assert code == 0 and len(first["jobs_run"]) == 2
    for row in first["rows"]:
        assert row["verdict"] == "unchanged" and row["diff"] == 0 and row["p_value"] == 1.0
        assert row["candidate_run_id"] == row["baseline_run_id"]
    with session_scope(env["settings"]) as s:
        n_rows = store.count_sample_rows(s, list(range(1, 100)))
    code, second = _gate(["fam:3", "--suite", "smoke"])
    assert code == 0 and second["jobs_run"] == []
    assert all(r["candidate_reused"] and r["baseline_reused"] and r["verdict"] == "unchanged" for r in second["rows"])
    with session_scope(env["settings"]) as s:
        assert store.count_sample_rows(s, list(range(1, 100))) == n_rows  # no new sample rows computed


def test_usage_errors_exit_2(env: dict) -> None:
    _ok(["adapters", "register", "fam", env["a1"], "--base", env["model"]])
    _ok(["suites", "add", env["suite"]])
    cases = [
        (["regress", "fam:1", "--suite", "smoke"], "has no promoted version"),
        (["regress", "fam:1", "--suite", "nosuch", "--against", "fam:1"], "suite nosuch:latest is not registered"),
        (["regress", "nope:1", "--suite", "smoke"], "candidate nope:1 is not registered"),
        (["regress", "fam:x", "--suite", "smoke"], "version must be an integer from 1 to"),
        (["regress", "fam:1", "--suite", "smoke", "--against", "fam:1"], "is the baseline itself"),
        (["regress", "fam:1", "--suite", "smoke", "--alpha", "2"], "--alpha"),
        (["regress", "fam:1"], "--suite"),
    ]
    for argv, message in cases:
        r = runner.invoke(app, argv)
        assert r.exit_code == 2, (argv, r.output)
        assert message in r.output and "Traceback" not in r.output, (argv, r.output)
    _ok(["adapters", "register", "fam", env["a2"], "--base", env["model"]])
    Path(env["a2"], "adapter_model.safetensors").rename(Path(env["a2"], "moved.safetensors"))
    try:
        r = runner.invoke(app, ["regress", "fam:2", "--suite", "smoke", "--against", "fam:1"])
        assert r.exit_code == 2 and "no weights at" in r.output, r.output
    finally:
        Path(env["a2"], "moved.safetensors").rename(Path(env["a2"], "adapter_model.safetensors"))
    with session_scope(env["settings"]) as s:
        assert store.list_jobs(s) == []  # refused before anything was planned


def test_suite_and_check_store_on_both_dialects(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url)
    with session_scope(settings) as s:
        suite, created = store.add_suite(s, name="s", version=1, spec={"a": 1}, sha256="x" * 64)
        again, created_again = store.add_suite(s, name="s", version=1, spec={"a": 1}, sha256="x" * 64)
        assert created and not created_again and again.id == suite.id
        with pytest.raises(ValueError, match="another definition"):
            store.add_suite(s, name="s", version=1, spec={"a": 2}, sha256="y" * 64)
        store.add_suite(s, name="s", version=2, spec={"a": 2}, sha256="y" * 64)
        assert store.find_suite(s, "s").version == 2 and store.find_suite(s, "s", 1).spec == {"a": 1}
        assert store.find_suite(s, "t") is None and [x.label for x in store.list_suites(s)] == ["s:1", "s:2"]
        base = store.get_or_create_base_model(s, "b", "/b")
        a1, _ = store.register_adapter(s, name="fam", path="/a1", method="lora", sha256="1" * 64, base_model_id=base.id)
        a2, _ = store.register_adapter(s, name="fam", path="/a2", method="lora", sha256="2" * 64, base_model_id=base.id)
        rows = [{"dataset": "d", "strategy": "ft", "diff": -0.1, "verdict": "regressed"}]
        store.record_regression_check(s, suite_id=suite.id, candidate_id=a2.id, baseline_id=a1.id, alpha=0.05,
                                      min_effect=0.01, verdict="regressed", rows=rows)
        (check,) = store.regression_checks(s, "fam")
        assert (check.candidate, check.baseline, check.suite, check.verdict, check.rows) == (
            "fam:2", "fam:1", "s:1", "regressed", rows)
        assert store.regression_checks(s, "other") == []


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_gate_through_celery_workers(service: dict, monkeypatch: pytest.MonkeyPatch, tiny_lora_dir: Path,
                                     second_lora: Path) -> None:
    """`tad regress --workers`: the shards run in a real `tad worker` (Celery, Redis, Postgres); the gate waits,
    then an embedded gate on the same database reuses every run."""
    import os

    env, tmp = service["env"], service["tmp"]
    settings = _use_env(monkeypatch, env["TAD_DATABASE_URL"], [service["model"].parent.parent, tmp,
                                                               second_lora.parent],
                        TAD_BROKER_URL=env["TAD_BROKER_URL"], TAD_QUEUE=env["TAD_QUEUE"])
    write_mc_dataset(tmp / "mc.jsonl", 24)
    (tmp / "suite.yaml").write_text(SUITE)
    model = str(service["model"])
    _ok(["adapters", "register", "fam", str(tiny_lora_dir), "--base", model])
    _ok(["adapters", "promote", "fam:1"])
    _ok(["adapters", "register", "fam", str(second_lora), "--base", model])
    _ok(["suites", "add", str(tmp / "suite.yaml")])
    worker = service["start_worker"]("gate")
    r = runner.invoke(app, ["regress", "fam:2", "--suite", "smoke", "--workers", "--timeout", "300", "--json"])
    assert r.exit_code in (0, 1), (r.output, worker.tail())
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(payload["jobs_run"]) == 4
    _check_rows_independently(settings, payload)
    with session_scope(settings) as s:
        ran_by = {sh.worker for j in payload["jobs_run"] for sh in store.job_shards(s, j)}
        assert all(store.get_job(s, j).status == "done" for j in payload["jobs_run"])
    assert ran_by and all(w and not w.endswith(f":{os.getpid()}") for w in ran_by), ran_by
    code, again = _gate(["fam:2", "--suite", "smoke"])
    assert again["jobs_run"] == [] and code == r.exit_code


def test_a_gate_that_could_not_fail_has_no_verdict(env: dict) -> None:
    """Four samples can never reach p < 0.05 (the most extreme outcome has p = 2 * 0.5**4 = 0.125): such a gate
    passed with exit 0. Now its rows are `too few`, the gate has no verdict (exit 2, the reason named) and no
    check is stored."""
    tiny = env["tmp"] / "tiny.yaml"
    tiny.write_text("name: tiny\nversion: 1\ndatasets:\n  - {dataset: mc.jsonl, split: val, limit: 4}\n"
                    "strategies: [ft]\nconfig: {batch_size: 4}\n")
    _setup_family(env)
    _ok(["suites", "add", str(tiny)])
    r = runner.invoke(app, ["regress", "fam:2", "--suite", "tiny", "--json"])
    assert r.exit_code == 2, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert payload["verdict"] == "no verdict" and payload["check_id"] is None
    assert [(row["n"], row["verdict"], row["p_holm"]) for row in payload["rows"]] == [(4, "too few", None)]
    out = _ok(["regress", "fam:2", "--suite", "tiny"], 2)
    assert "NO VERDICT" in out and "4 paired samples, too few for any outcome to reach alpha 0.05" in out
    with session_scope(env["settings"]) as s:
        assert store.regression_checks(s, "fam") == []


def test_a_sample_that_failed_on_one_side_only_leaves_its_row_without_a_verdict(env: dict) -> None:
    """Failed samples (a stored error, no result) are left out of the pairs: a candidate that fails on its hard
    samples was compared on the easy ones only. A row with errors on one side only now has no verdict."""
    from services.result_rows import error_rows

    _setup_family(env)
    code, first = _gate(["fam:2", "--suite", "smoke"])
    row = next(r for r in first["rows"] if r["limit"] == 20 and r["strategy"] == "ft")
    assert row["one_sided_errors"] == 0 and row["verdict"] != "errors"
    with session_scope(env["settings"]) as s:  # the candidate's evaluation of sample 3 failed
        store.upsert_sample_results(s, error_rows(3, "s3", {"ft": row["candidate_run_id"]}, "RuntimeError: boom"))
    r = runner.invoke(app, ["regress", "fam:2", "--suite", "smoke", "--json"])
    again = json.loads(r.stdout.strip().splitlines()[-1])
    (hit,) = [x for x in again["rows"] if x["candidate_run_id"] == row["candidate_run_id"] and x["strategy"] == "ft"]
    assert (hit["verdict"], hit["one_sided_errors"], hit["n"]) == ("errors", 1, row["n"] - 1)
    regressed = any(x["verdict"] == "regressed" for x in again["rows"])
    assert r.exit_code == again["exit_code"] == (1 if regressed else 2)
    if not regressed:
        out = _ok(["regress", "fam:2", "--suite", "smoke"], 2)
        assert "NO VERDICT" in out and "1 samples failed on one side only" in out
