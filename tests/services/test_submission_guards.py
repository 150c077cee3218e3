"""Submission and CLI guards, through the real `tad` executable against Postgres (and a private Redis):

- a control character (NUL) is refused with its line and field, and nothing is stored;
- an `answer_pattern` is compiled and tried at validation; one that matches the empty string (`(zzz)?`) is
  valid and never crashes extraction;
- an adapter made for another base model is refused at submission (weights' shapes vs the base's modules);
- user-supplied names with Rich markup (`mallory[/]`, `evil[/bold]`) print literally in `tad jobs`, `tad results`,
  `tad adapters list`;
- an unreachable database or broker is one line and exit code 3, password hidden;
- `tad cancel` checks the submit token like the dashboard's Cancel button.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from services.db.schema import upgrade
from services.planning import plan_job
from services.settings import Settings
from services.submit_request import SubmissionError, SubmitRequest
from tad_core.extraction import extract_answer
from tad_core.samples import Sample
from tests.services.conftest import free_port
from tests.services.helpers import tad_cli, write_mc_dataset



@pytest.fixture
def pg(pg_url: str, tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> dict:
    upgrade(pg_url)
    roots = [tiny_model_dir.parent.parent, tmp_path]
    settings = Settings(database_url=pg_url, model_roots=roots)
    env = {"TAD_DATABASE_URL": pg_url, "TAD_MODEL_ROOTS": ":".join(map(str, roots)), "PATH": "/usr/bin:/bin",
           "TAD_CACHE_DIR": "/tmp/tadcache", "HOME": str(Path.home())}
    return {"url": pg_url, "settings": settings, "env": env, "model": tiny_model_dir, "lora": tiny_lora_dir,
            "tmp": tmp_path}


def _count(url: str, table: str) -> int:
    engine = create_engine(url)
    with engine.connect() as c:
        n = c.execute(text(f"SELECT count(*) FROM {table}")).scalar()
    engine.dispose()
    return int(n)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_control_characters_and_empty_patterns_refused_nothing_stored(pg: dict) -> None:
    data = _write(pg["tmp"] / "bad.jsonl", [
        {"id": "ok", "prompt": "2+2=", "reference": "4"},
        {"id": "nul", "prompt": "a\u0000b", "reference": "4"},
        {"id": "pat", "prompt": "2+2=", "reference": "4", "answer_pattern": "answer: (\\d+"},
        {"id": "meta", "prompt": "q", "choices": ["a", "b"], "answer": 0, "metadata": {"note": "bell\u0007"}},
    ])
    req = SubmitRequest(dataset=str(data), base=str(pg["model"]), strategies=["ft"])
    with pytest.raises(SubmissionError) as e:
        plan_job(req, pg["settings"])
    msg = "\n".join(e.value.errors)
    assert "line 2: field 'prompt': contains the control character U+0000" in msg
    assert "line 3: field 'answer_pattern': not a valid regular expression" in msg
    assert "line 4: field 'metadata': contains the control character U+0007" in msg
    assert _count(pg["url"], "datasets") == 0 and _count(pg["url"], "jobs") == 0
    # a pattern that matches the empty string, or leaves its group unset, is valid and never crashes extraction
    for pattern, found in (("(zzz)?", None), ("(zzz)?|4", None), ("(zzz)?", "zzz")):
        sample = Sample(id="x", prompt="p", reference="4", answer_pattern=pattern)
        assert extract_answer("the answer is 4" if found is None else "it is zzz", sample) == found
    ok = _write(pg["tmp"] / "ok.jsonl", [{"id": "g", "prompt": "2+2=", "reference": "4", "answer_pattern": "(zzz)?"}])
    assert plan_job(SubmitRequest(dataset=str(ok), base=str(pg["model"]), strategies=["ft"]), pg["settings"]).job.id


def test_adapter_for_another_base_refused_at_submission(pg: dict) -> None:
    other = pg["tmp"] / "wider_base"
    shutil.copytree(pg["model"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128)  # same architecture, other widths: the LoRA cannot fit
    (other / "config.json").write_text(json.dumps(cfg))
    data = write_mc_dataset(pg["tmp"] / "d.jsonl", 4)
    req = SubmitRequest(dataset=str(data), base=str(other), adapter=str(pg["lora"]), strategies=["ft"])
    with pytest.raises(SubmissionError) as e:
        plan_job(req, pg["settings"])
    assert "does not fit base model" in str(e.value) and "64 features here, the adapter expects 32" in str(e.value)
    assert _count(pg["url"], "jobs") == 0 and _count(pg["url"], "adapters") == 0
    # the right base is accepted
    ok = plan_job(SubmitRequest(dataset=str(data), base=str(pg["model"]), adapter=str(pg["lora"]),
                                strategies=["ft"]), pg["settings"])
    assert ok.job.id == 1


def test_markup_in_user_names_prints_literally(pg: dict) -> None:
    data = write_mc_dataset(pg["tmp"] / "d[red]x.jsonl", 4)
    # an adapter name that `NAME:VERSION` could never resolve is refused, naming the field; nothing stored
    with pytest.raises(SubmissionError, match=r"adapter name 'evil\[/bold\]': use letters"):
        plan_job(SubmitRequest(dataset=str(data), base=str(pg["model"]), adapter=str(pg["lora"]),
                               adapter_name="evil[/bold]", strategies=["ft"]), pg["settings"])
    assert _count(pg["url"], "jobs") == 0 and _count(pg["url"], "adapters") == 0
    plan = plan_job(SubmitRequest(dataset=str(data), base=str(pg["model"]), adapter=str(pg["lora"]),
                                  strategies=["ft"], submitted_by="mallory[/]"), pg["settings"])
    for args, expect in ((["jobs"], "mallory[/]"), (["jobs"], "d[red]x:val"), (["results", str(plan.job.id)], "d[red]x")):
        r = tad_cli(pg["env"], *args)
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout, r.stdout
        assert "Traceback" not in r.stderr


def test_unreachable_database_and_broker_exit_3_in_one_line(pg: dict) -> None:
    dead_db = f"postgresql+psycopg://postgres:s3cretpw@127.0.0.1:{free_port()}/test"
    for args in (["jobs"], ["status", "1"], ["cancel", "1"], ["worker"]):
        r = tad_cli({**pg["env"], "TAD_DATABASE_URL": dead_db}, *args)
        assert r.returncode == 3, (args, r.stderr)
        assert r.stderr.startswith("error: database unavailable at postgresql+psycopg://postgres:***@127.0.0.1")
        assert len(r.stderr.strip().splitlines()) == 1 and "s3cretpw" not in r.stderr, r.stderr
    plan_job(SubmitRequest(dataset=str(write_mc_dataset(pg["tmp"] / "d.jsonl", 4)), base=str(pg["model"]),
                           strategies=["ft"]), pg["settings"])
    r = tad_cli({**pg["env"], "TAD_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}, "requeue", "1")
    assert r.returncode == 3 and "could not reach the broker" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cancel_checks_the_submit_token(pg: dict) -> None:
    plan_job(SubmitRequest(dataset=str(write_mc_dataset(pg["tmp"] / "d.jsonl", 4)), base=str(pg["model"]),
                           strategies=["ft"], token="t0ken"),
             pg["settings"].model_copy(update={"submit_token": SecretStr("t0ken")}))
    env = {**pg["env"], "TAD_SUBMIT_TOKEN": "t0ken"}
    r = tad_cli(env, "cancel", "1")
    assert r.returncode == 2 and "requires a submit token" in r.stderr
    r = tad_cli(env, "cancel", "1", "--token", "wrong")
    assert r.returncode == 2 and "submit token rejected" in r.stderr
    engine = create_engine(pg["url"])
    with engine.connect() as c:
        assert c.execute(text("SELECT status, cancel_requested FROM jobs")).one() == ("queued", False)
    r = tad_cli(env, "cancel", "1", "--token", "t0ken")
    assert r.returncode == 0 and "job 1: cancelled" in r.stdout, r.stderr
    engine.dispose()


def test_a_dataset_file_records_the_name_it_was_sent_under_not_a_server_path(pg: dict) -> None:
    """An upload is planned from a temporary copy: the datasets table records the uploaded file's name (what the
    API and the dashboard pass as `source_name`); a file named on the command line records its absolute path."""
    uploaded = write_mc_dataset(pg["tmp"] / "copy.jsonl", 4)
    plan = plan_job(SubmitRequest(dataset=str(uploaded), base=str(pg["model"]), source_name="upload:my colours.jsonl"),
                    pg["settings"])
    assert plan.dataset_created and plan.dataset.source == "upload:my colours.jsonl" and plan.dataset.name == "copy"
    local = write_mc_dataset(pg["tmp"] / "local.jsonl", 5)
    plan = plan_job(SubmitRequest(dataset=str(local), base=str(pg["model"])), pg["settings"])
    assert plan.dataset.source == str(local.resolve())


def test_values_over_the_database_column_sizes_are_refused_by_name(pg: dict) -> None:
    """A 300-character sample id passed the validator and Postgres refused it with 'value too long for type
    character varying(200)', naming no line or field (SQLite stored it). Each limit is now checked up front."""
    long_id = write_mc_dataset(pg["tmp"] / "ids.jsonl", 3)
    rows = [json.loads(x) for x in long_id.read_text().splitlines()]
    rows[1]["id"] = "x" * 300
    long_id.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = write_mc_dataset(pg["tmp"] / "ok.jsonl", 3)
    cases = [
        (SubmitRequest(dataset=str(long_id), base=str(pg["model"]), strategies=["ft"]),
         "line 2: field 'id': at most 200 characters (got 300)"),
        (SubmitRequest(dataset=str(data), base=str(pg["model"]), strategies=["dola:layers=[" + ",".join(map(str, range(100))) + "]"]),
         "its run key is"),
        (SubmitRequest(dataset=f"{'n' * 201}={data}", base=str(pg["model"]), strategies=["ft"]),
         "dataset name"),
    ]
    for req, message in cases:
        with pytest.raises(SubmissionError) as e:
            plan_job(req, pg["settings"])
        assert message in str(e.value), str(e.value)
    assert _count(pg["url"], "jobs") == 0 and _count(pg["url"], "datasets") == 0


def test_bad_config_split_and_dola_layers_are_refused_by_name(pg: dict) -> None:
    """Config values of the wrong type or range (the API passes JSON through), split names that are not names, and
    DoLa layers past the base model's depth were stored and queued: `stop: "abc"` became three one-letter stops,
    `stop: [""]` cut every output to nothing, `kv_topk: -5` and `dola:layers=[999]` failed every sample of a job
    that then ended `done`."""
    data = write_mc_dataset(pg["tmp"] / "ok.jsonl", 3)
    cases = [
        ({"config": {"kv_topk": -5}}, "kv_topk must be an integer in [0, 1000], got -5"),
        ({"config": {"stop": "abc"}}, "stop must be a list of non-empty strings, got 'abc'"),
        ({"config": {"stop": [""]}}, "stop must be a list of non-empty strings, got ['']"),
        ({"config": {"max_new_tokens": True}}, "max_new_tokens must be an integer"),
        ({"config": {"seed": "abc"}}, "seed must be an integer"),
        ({"config": {"seed": 2**70}}, "seed must be an integer"),
        ({"config": {"delimiter": 5}}, "delimiter must be a string, got 5"),
        ({"split": "no such/split!"}, "--split 'no such/split!': a split name is"),
        ({"split": ""}, "--split '': a split name is"),
        ({"strategies": ["dola:layers=[999]"]}, "layers [999] are not premature layers of a 2-layer model"),
    ]
    for extra, message in cases:
        req = SubmitRequest(**{"dataset": str(data), "base": str(pg["model"]), "strategies": ["ft"], **extra})
        with pytest.raises(SubmissionError) as e:
            plan_job(req, pg["settings"])
        assert message in str(e.value), (extra, str(e.value))
    assert _count(pg["url"], "jobs") == 0 and _count(pg["url"], "datasets") == 0
    ok = SubmitRequest(dataset=str(data), base=str(pg["model"]), strategies=["dola:layers=[0]"], split="test-1")
    assert plan_job(ok, pg["settings"]).job.id


def test_cli_number_and_export_errors_name_the_option(pg: dict) -> None:
    """Ids past the database's integers, a bad --status, unwritable export targets and a URI MLflow refuses exit 2
    with the option named (they were tracebacks, exit 1)."""
    env = pg["env"]
    for args, message in (
            (["status", "99999999999999999999"], "2147483647"),
            (["results", "3000000000"], "2147483647"),
            (["jobs", "--status", "bogus"], "--status 'bogus': expected one of queued"),
            (["adapters", "promote", "x:99999999999999999999"], "the version must be an integer from 1 to"),
            (["adapters", "promote", "x:\u00b2"], "the version must be an integer from 1 to"),
            (["tokens", "revoke", "99999999999999999999"], "2147483647")):
        out = tad_cli(env, *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    data = write_mc_dataset(pg["tmp"] / "ok.jsonl", 2)
    run = tad_cli(env, "run", "--dataset", str(data), "--base", str(pg["model"]), "--json")
    assert run.returncode == 0, run.stderr
    job = str(json.loads(run.stdout)["job"]["id"])
    for args, message in ((["--csv", "-o", str(pg["tmp"] / "missing" / "x.csv")], "--output "),
                          (["--lmeval", str(data)], f"--lmeval {data}: Not a directory"),
                          (["--mlflow", "bogus://x"], "--mlflow bogus://x: ")):
        out = tad_cli(env, "results", job, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
