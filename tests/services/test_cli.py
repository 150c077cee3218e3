"""The service commands through the real `tad` app (Typer runner, in-process): exit codes and outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.settings import get_settings
from tests.services.helpers import write_mc_dataset

runner = CliRunner()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("TAD_DATABASE_URL", db)
    monkeypatch.setenv("TAD_MODEL_ROOTS", f"{tiny_model_dir.parent.parent}:{tmp_path}")
    monkeypatch.delenv("TAD_SUBMIT_TOKEN", raising=False)
    get_settings.cache_clear()
    yield {"db": db, "data": write_mc_dataset(tmp_path / "d.jsonl", 6), "model": str(tiny_model_dir),
           "lora": str(tiny_lora_dir), "tmp": tmp_path}
    get_settings.cache_clear()


def _run_args(env: dict, *extra: str) -> list[str]:
    return ["run", "--dataset", str(env["data"]), "--base", env["model"], "--adapter", env["lora"],
            "--batch-size", "3", *extra]


def test_run_prints_leaderboard_and_results_export(env: dict) -> None:
    r = runner.invoke(app, _run_args(env, "-s", "ft", "-s", "tad:alpha=1,2"))
    assert r.exit_code == 0, r.output
    assert "acc ± stderr" in r.output and "tad(alpha=2.0,beta=0.0)" in r.output and "McNemar" in r.output
    r = runner.invoke(app, _run_args(env, "-s", "tad:alpha=1", "--json"))
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert payload["job"]["status"] == "done" and {x["key"] for x in payload["leaderboard"]} == {"ft", "tad(alpha=1.0,beta=0.0)"}
    assert len(payload["samples"]["ft"]) == 6
    r = runner.invoke(app, ["results", "1", "--csv"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("strategy,run_id,sample_index")
    assert len(r.stdout.strip().splitlines()) == 1 + 6 * 3
    r = runner.invoke(app, ["jobs", "--json"])
    assert [j["id"] for j in json.loads(r.stdout)] == [2, 1]
    r = runner.invoke(app, ["status", "1", "--watch"])
    assert r.exit_code == 0 and "job 1: done, 6/6 samples" in r.stdout
    r = runner.invoke(app, ["cancel", "1"])
    assert r.exit_code == 0 and "job 1: done" in r.stdout
    assert runner.invoke(app, ["db", "current"]).exit_code == 0


def test_user_errors_exit_2_without_traceback(env: dict) -> None:
    cases = [
        (_run_args(env, "-s", "tad:alpha=oops"), "alpha"),
        (_run_args(env, "-s", "nosuch"), "unknown strategy"),
        (_run_args(env, "--dtype", "int8"), "dtype must be one of"),
        (["run", "--dataset", str(env["tmp"] / "missing.jsonl"), "--base", env["model"]], "missing.jsonl"),
        (["run", "--dataset", str(env["data"]), "--base", env["model"], "--adapter", "/etc"], "outside the allowed"),
        (["status", "999"], "job 999 does not exist"),
        (["results", "999"], "job 999 does not exist"),
        (["requeue", "999"], "job 999 does not exist"),
    ]
    for argv, message in cases:
        r = runner.invoke(app, argv)
        assert r.exit_code == 2, (argv, r.output)
        assert message in r.output and "Traceback" not in r.output, r.output
    bad = env["tmp"] / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "p", "choices": ["a"], "answer": 3}\n')
    r = runner.invoke(app, ["run", "--dataset", str(bad), "--base", env["model"]])
    assert r.exit_code == 2 and "line 1" in r.output and "nothing was stored" in r.output


def test_token_required_when_configured(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAD_SUBMIT_TOKEN", "s3cret")
    get_settings.cache_clear()
    r = runner.invoke(app, _run_args(env, "-s", "ft"))
    assert r.exit_code == 2 and "requires a submit token" in r.output
    r = runner.invoke(app, _run_args(env, "-s", "ft", "--token", "wrong"))
    assert r.exit_code == 2 and "rejected" in r.output and "s3cret" not in r.output
    assert runner.invoke(app, _run_args(env, "-s", "ft", "--token", "s3cret")).exit_code == 0


def test_out_of_date_database_is_refused(env: dict, monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    monkeypatch.setenv("TAD_DATABASE_URL", pg_url)  # shared databases are never migrated silently
    get_settings.cache_clear()
    r = runner.invoke(app, ["jobs"])
    assert r.exit_code == 1 and "run `tad db upgrade`" in r.output
    r = runner.invoke(app, ["worker"])
    assert r.exit_code == 1 and "run `tad db upgrade`" in r.output
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(app, ["jobs"]).exit_code == 0


def test_leaderboard_shows_the_calibrated_mu_and_its_calibration(capsys: pytest.CaptureFixture[str]) -> None:
    """A calibrated svdecode run prints the mu it ran with (brackets are not taken for rich markup)."""
    from services.cli.common import print_leaderboard
    from services.db.store import LeaderboardRow

    info = {"mu": 0.981002, "calibration": "9c483289e9ea395f", "calibration_dataset": "arc_easy:train",
            "calibration_n_samples": 128, "calibration_n_tokens": 597}
    row = LeaderboardRow(job_id=1, run_id=11, job_status="done", dataset="arc_easy", split="val", base="b",
                         adapter="a:1", strategy="svdecode", key="svdecode(beta=0.1,mu=auto)", params={}, n=300,
                         acc=0.49, acc_stderr=0.0289, acc_norm=0.4933, acc_norm_stderr=0.0289, fixed=21, broken=61,
                         mcnemar_p=1.13e-05, info=info, mcnemar_p_holm=4.52e-05)
    print_leaderboard([row], "job [1]")
    out = capsys.readouterr().out
    assert "svdecode(beta=0.1,mu=auto) mu=0.981" in out and "21/61" in out and "job [1]" in out
    assert "4.52e-05" in out and "Holm-Bonferroni" in out
    assert "run 11: mu=0.981002 calibrated on arc_easy:train (128 samples, 597 tokens), calibration 9c483289e9ea395f" in out


def test_run_with_llm_adapters_format_stop_and_extraction(env: dict) -> None:
    """`--format llm-adapters` turns the MC file into generation runs named with the format; unparsed outputs are
    counted in the table and in the JSON aggregates; a bad format or extraction mode exits 2 naming it."""
    r = runner.invoke(app, _run_args(env, "-s", "ft", "-s", "tad:alpha=1", "--format", "llm-adapters",
                                     "--max-new-tokens", "4", "--stop", "\\n", "--json"))
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    keys = {x["key"] for x in payload["leaderboard"]}
    assert keys == {"ft", "tad(alpha=1.0,beta=0.0)"}
    ft_rows = payload["samples"]["ft"]
    assert all(row["output"] is not None and row["pred"] is None for row in ft_rows)  # generated, not scored
    ft = next(x for x in payload["leaderboard"] if x["key"] == "ft")
    unparsed = sum(row["extracted"] is None for row in ft_rows)
    assert ft["metrics"]["unparsed"] == unparsed and ft["variant"] == "llm-adapters@1"
    assert all("\n" not in row["output"] for row in ft_rows)  # cut at the stop sequence
    r = runner.invoke(app, ["results", str(payload["job"]["id"])])
    assert "[llm-adapters@1]" in r.output and "unparsed" in r.output and f"{unparsed} (" in r.output
    for argv, message in ((_run_args(env, "--format", "nope"), "unknown format 'nope'"),
                          (_run_args(env, "--extract", "best"), "unknown extraction mode 'best'"),
                          (_run_args(env, "--num-beams", "2", "--temperature", "0.5"), "num_beams > 1")):
        r = runner.invoke(app, argv)
        assert r.exit_code == 2 and message in r.output, r.output


def test_formats_lists_each_with_an_example() -> None:
    r = runner.invoke(app, ["formats", "--json"])
    assert r.exit_code == 0
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"mc-loglik", "llm-adapters", "chat", "k-shot"}
    assert "Answer format: answer1/answer2/answer3" in rows["llm-adapters"]["example"]
    assert rows["k-shot"]["key"] == "k-shot@1:k=5,seed=0"


def test_k_shot_job_draws_demonstrations_from_the_file(env: dict) -> None:
    """A k-shot job on a file: the worker renders each sample with demonstrations from the file's other samples,
    exactly as tad_core does with the same pool (stored scores equal a direct evaluation)."""
    from tad_core.datasets import validate_jsonl
    from tad_core.evaluate import EvalConfig, evaluate_batch
    from tad_core.formats import format_context
    from tad_core.models import load_pair
    from tad_core.strategies import parse_strategy_arg

    r = runner.invoke(app, _run_args(env, "-s", "ft", "--format", "k-shot:k=2,seed=3", "--json"))
    assert r.exit_code == 0, r.output
    stored = [x for row in json.loads(r.stdout.strip().splitlines()[-1])["samples"]["ft"] for x in row["scores"]]
    samples = validate_jsonl(env["data"])
    pair = load_pair(env["model"], adapter=env["lora"])
    config = EvalConfig(batch_size=3, format="k-shot:k=2,seed=3")
    direct = evaluate_batch(pair, samples, parse_strategy_arg("ft"), config,
                            format_context(config.format, "d", samples))
    assert stored == pytest.approx([x for res in direct for x in res.outcomes["ft"].scores], abs=1e-4)
    plain = evaluate_batch(pair, samples, parse_strategy_arg("ft"), EvalConfig(batch_size=3))
    assert [x for res in plain for x in res.outcomes["ft"].scores] != pytest.approx(stored, abs=1e-4)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_an_interrupted_run_is_finished_by_resume(env: dict, how: str) -> None:
    """A real `tad run` process stopped mid-job (killed, or Ctrl-C) leaves its job `running` with the samples it
    stored; `tad resume JOB` (a new process) takes over the dead process's shard and finishes the job with every
    (run, sample) row exactly once. Ctrl-C exits 130 and names the command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sqlalchemy import create_engine, text

    from services.db import store
    from services.db.session import session_scope
    from tests.services.helpers import ROOT, tad_cli

    n = 12
    data = write_mc_dataset(env["tmp"] / "slow.jsonl", n, meta={i: {"tad_test_sleep": 0.4} for i in range(n)})
    child_env = {**os.environ, "TAD_ENABLE_TEST_FAULTS": "1", "TAD_HEARTBEAT_INTERVAL": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "run", "--dataset", str(data), "--base",
                             env["model"], "--adapter", env["lora"], "-s", "ft", "-s", "tad:alpha=1", "--batch-size",
                             "2", "--shard-size", "6"], env=child_env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    engine = create_engine(env["db"])
    deadline = time.monotonic() + 120
    stored = 0
    while stored < 4 and time.monotonic() < deadline:  # two batches of both runs stored
        time.sleep(0.2)
        try:
            with engine.connect() as c:
                stored = c.execute(text("SELECT count(*) FROM sample_results")).scalar()
        except Exception:  # noqa: BLE001 - the table appears once the run has migrated the new database
            stored = 0
    assert stored >= 4 and proc.poll() is None, proc.communicate()
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "SIGINT":
        assert proc.returncode == 130 and "tad resume 1" in err, err
    with session_scope(get_settings()) as s:
        job = store.get_job(s, 1)
    assert job.status == "running" and job.samples_done < n  # the stored rows above are kept
    r = tad_cli({**child_env}, "resume", "1", timeout=200)
    assert r.returncode == 0, r.stderr
    assert "tad(alpha=1.0,beta=0.0)" in r.stdout
    with session_scope(get_settings()) as s:
        job = store.get_job(s, 1)
        assert job.status == "done" and job.samples_done == n
        for run in store.job_runs(s, 1):
            assert [x["sample_index"] for x in store.sample_rows(s, run.id)] == list(range(n)), run.key
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM sample_results")).scalar() == 2 * n  # none stored twice
    engine.dispose()
    again = tad_cli({**child_env}, "resume", "1")
    assert again.returncode == 0 and "already done" in again.stderr
    missing = tad_cli({**child_env}, "resume", "99")
    assert missing.returncode == 2 and "99" in missing.stderr
