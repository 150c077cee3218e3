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
    from services.cli.jobs_cmd import _print_leaderboard
    from services.db.store import LeaderboardRow

    info = {"mu": 0.981002, "calibration": "9c483289e9ea395f", "calibration_dataset": "arc_easy:train",
            "calibration_n_samples": 128, "calibration_n_tokens": 597}
    row = LeaderboardRow(job_id=1, run_id=11, job_status="done", dataset="arc_easy", split="val", base="b",
                         adapter="a:1", strategy="svdecode", key="svdecode(beta=0.1,mu=auto)", params={}, n=300,
                         acc=0.49, acc_stderr=0.0289, acc_norm=0.4933, acc_norm_stderr=0.0289, fixed=21, broken=61,
                         mcnemar_p=1.13e-05, info=info, mcnemar_p_holm=4.52e-05)
    _print_leaderboard([row], "job [1]")
    out = capsys.readouterr().out
    assert "svdecode(beta=0.1,mu=auto) mu=0.981" in out and "21/61" in out and "job [1]" in out
    assert "4.52e-05" in out and "Holm-Bonferroni" in out
    assert "run 11: mu=0.981002 calibrated on arc_easy:train (128 samples, 597 tokens), calibration 9c483289e9ea395f" in out
