"""A results database seeded through the real store functions, and helpers to open the dashboard on it.

The seed (SQLite file migrated with the project's Alembic `upgrade`; the same seed on Postgres for the view
tests) holds, on base model `tiny-base`:
- adapter family `qa-lora` v1 (promoted) and v2, each evaluated on `toy-mc` (20 MC samples) with
  ft, tad(alpha=0.5|1.0|2.0, beta=0.0) and tad_log(alpha=0.5, beta=0.1); v2's ft is much worse (a regression);
- v1 on `toy-gen` (6 generation samples, per-step kv statistics);
- a running job on `toy-live` (5 of 24 samples stored, a live worker heartbeat) and a failed one.
Correctness patterns are plain functions (`CORRECT`), so tests compute expected numbers independently.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"

BASE = "tiny-base"
FAMILY = "qa-lora"
N_MC = 20
N_GEN = 6
KEYS = ["ft", "tad(alpha=0.5,beta=0.0)", "tad(alpha=1.0,beta=0.0)", "tad(alpha=2.0,beta=0.0)",
        "tad_log(alpha=0.5,beta=0.1)"]

# (adapter version, strategy key) -> is sample i answered correctly on toy-mc
CORRECT: dict[tuple[int, str], Callable[[int], bool]] = {
    (1, "ft"): lambda i: i % 2 == 0,
    (1, "tad(alpha=0.5,beta=0.0)"): lambda i: i % 2 == 0 or i in (1, 3),
    (1, "tad(alpha=1.0,beta=0.0)"): lambda i: i < 14,
    (1, "tad(alpha=2.0,beta=0.0)"): lambda i: i < 12,
    (1, "tad_log(alpha=0.5,beta=0.1)"): lambda i: i % 3 != 0,
    (2, "ft"): lambda i: i in (0, 2),
    (2, "tad(alpha=0.5,beta=0.0)"): lambda i: i % 2 == 0 or i in (1, 3),
    (2, "tad(alpha=1.0,beta=0.0)"): lambda i: i < 14,
    (2, "tad(alpha=2.0,beta=0.0)"): lambda i: i < 12,
    (2, "tad_log(alpha=0.5,beta=0.1)"): lambda i: i % 3 != 0,
}
GEN_CORRECT: dict[str, Callable[[int], bool]] = {"ft": lambda i: i < 2, "tad(alpha=1.0,beta=0.0)": lambda i: i < 4}


@pytest.fixture(scope="session", autouse=True)
def _cache_dir() -> None:
    os.environ.setdefault("TAD_CACHE_DIR", "/tmp/tadcache")


def mc_sample(i: int) -> dict:
    choices = ["red", "green", "blue", "yellow"][: 2 + i % 3]
    return {"id": f"q{i}", "prompt": f"Question {i}: which colour is item {i}? Answer:", "choices": choices,
            "answer": i % 2}


def gen_sample(i: int) -> dict:
    return {"id": f"g{i}", "prompt": f"What is {i} + {i}?", "reference": str(2 * i)}


def per_step(i: int) -> list[dict]:
    """Per-step kv entries as the generator stores them (token ids; promoted / demoted [str, id, value])."""
    steps = []
    for t in range(4):
        steps.append({"token": 100 + t, "flip": t == 1, "kl": round(0.1 * (t + 1) + 0.01 * i, 5), "js": 0.05,
                      "kv_l1": 0.2 * (t + 1), "kv_max": 0.1, "h_f": 1.0, "h_b": 1.5,
                      "promoted": [[f"up{t}a", 200 + t, 0.3], [f"up{t}b", 210 + t, 0.2]],
                      "demoted": [[f"down{t}a", 300 + t, 0.25], [f"down{t}b", 310 + t, 0.1]]})
    return steps


@dataclass
class Seed:
    url: str
    runs: dict[tuple[str, int, str], int] = field(default_factory=dict)  # (dataset, adapter version, key) -> run
    jobs: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)


def _specs(keys: list[str]) -> list:
    from services.db import store

    return [store.RunSpec(k.split("(")[0], _params(k), k, f"hash-{k}") for k in keys]


def _params(key: str) -> dict:
    if "(" not in key:
        return {}
    inner = key[key.index("(") + 1:-1]
    return {k: float(v) for k, v in (p.split("=") for p in inner.split(","))}


def _complete_job(s, *, base_id: int, adapter_id: int | None, dataset_id: int, n: int, keys: list[str],
                  rows_for: Callable[[str, int], dict], spec: dict) -> tuple[int, dict[str, int]]:
    from services.db import aggregates, store

    job = store.create_job(s, spec=spec, submitted_by="seed", base_model_id=base_id, adapter_id=adapter_id,
                           dataset_id=dataset_id, n_samples=n, runs=_specs(keys), shard_ranges=[(0, n)])
    runs = {r.key: r.id for r in store.job_runs(s, job.id)}
    claim = store.claim_shard(s, job.id, 0, "seed-worker", max_attempts=3)
    store.upsert_sample_results(s, [{"run_id": runs[k], "sample_index": i, **rows_for(k, i)}
                                    for k in keys for i in range(n)])
    store.shard_progress(s, claim.shard.id, n)
    aggregates.store_shard_partials(s, list(runs.values()), 0, n)  # as a worker ends its shard
    store.finish_shard(s, claim.shard.id, "done")
    aggregates.refresh_aggregates(s, list(runs.values()))
    return job.id, runs


def seed_database(url: str) -> Seed:
    """Fill a migrated database through the store functions (see the module docstring)."""
    from services.db import store
    from services.db.session import make_engine, session_scope

    seed = Seed(url)
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            base = store.get_or_create_base_model(s, BASE, "/models/tiny-base")
            mc, _ = store.register_dataset(s, name="toy-mc", split="val", content_hash="h-mc", task_type="mc",
                                           source="seed", samples=[mc_sample(i) for i in range(N_MC)])
            gen, _ = store.register_dataset(s, name="toy-gen", split="val", content_hash="h-gen", task_type="gen",
                                            source="seed", samples=[gen_sample(i) for i in range(N_GEN)])
            live, _ = store.register_dataset(s, name="toy-live", split="val", content_hash="h-live",
                                             task_type="mc", source="seed", samples=[mc_sample(i) for i in range(24)])
            seed.datasets = {"toy-mc": mc.id, "toy-gen": gen.id, "toy-live": live.id}
            adapters = {}
            for v in (1, 2):
                ad, _ = store.register_adapter(s, name=FAMILY, path=f"/adapters/{FAMILY}-{v}", method="lora",
                                               sha256=f"w{v}" * 8, base_model_id=base.id)
                adapters[v] = ad
            store.promote_adapter(s, FAMILY, 1)

        for v in (1, 2):
            def mc_row(key: str, i: int, v: int = v) -> dict:
                ok = CORRECT[(v, key)](i)
                ft_ok = CORRECT[(v, "ft")](i)
                answer = i % 2
                n_choices = 2 + i % 3
                pred = answer if ok else (answer + 1) % n_choices
                paired = key != "ft"
                return {"sample_id": f"q{i}", "pred": pred, "pred_norm": pred, "scores": [-1.0] * n_choices,
                        "correct": ok, "correct_norm": ok, "tokens": 0, "latency_s": 0.01,
                        "flip_rate": ((i % 4) / 4) if paired else None,
                        "vs_ft": (None if ok == ft_ok else ("fixed" if ok else "broken")) if paired else None,
                        "kv": {"kl_mean": 0.1 * (i % 5), "kv_l1_mean": 0.2 + 0.01 * i, "js_mean": 0.02,
                               "steps": 1, "promoted": [["Paris", 1, 0.3]], "demoted": [["London", 2, 0.2]]}}

            with session_scope(engine) as s:
                job_id, runs = _complete_job(
                    s, base_id=base.id, adapter_id=adapters[v].id, dataset_id=mc.id, n=N_MC, keys=KEYS,
                    rows_for=mc_row, spec={"base": BASE, "adapter_label": f"{FAMILY}:{v}",
                                           "strategies": [{"name": k.split("(")[0], "params": _params(k)}
                                                          for k in KEYS]})
            seed.jobs[f"mc-v{v}"] = job_id
            seed.runs.update({("toy-mc", v, k): r for k, r in runs.items()})

        def gen_row(key: str, i: int) -> dict:
            ok = GEN_CORRECT[key](i)
            out = str(2 * i) if ok else "I do not know"
            return {"sample_id": f"g{i}", "output": f"The answer is {out}", "extracted": out if ok else None,
                    "correct": ok, "tokens": 4, "latency_s": 0.2,
                    "flip_rate": 0.25 if key != "ft" else None,
                    "kv": {"kl_mean": 0.25, "kv_l1_mean": 0.5, "steps": 4, "per_step": per_step(i)}}

        with session_scope(engine) as s:
            job_id, runs = _complete_job(s, base_id=base.id, adapter_id=adapters[1].id, dataset_id=gen.id, n=N_GEN,
                                         keys=list(GEN_CORRECT), rows_for=gen_row, spec={"base": BASE})
        seed.jobs["gen"] = job_id
        seed.runs.update({("toy-gen", 1, k): r for k, r in runs.items()})

        with session_scope(engine) as s:  # a job in flight: 5 of 24 samples stored, a worker alive on it
            job = store.create_job(s, spec={"base": BASE, "strategies": [{"name": "ft", "params": {}}]},
                                   submitted_by="alice", base_model_id=base.id, adapter_id=adapters[2].id,
                                   dataset_id=live.id, n_samples=24, runs=_specs(["ft"]),
                                   shard_ranges=[(0, 8), (8, 16), (16, 24)])
            claim = store.claim_shard(s, job.id, 0, "gpu-1:4242", max_attempts=3)
            run_id = store.job_runs(s, job.id)[0].id
            store.upsert_sample_results(s, [{"run_id": run_id, "sample_index": i, "sample_id": f"q{i}",
                                             "correct": True, "pred": 0} for i in range(5)])
            store.shard_progress(s, claim.shard.id, 5)
            store.heartbeat(s, "gpu-1:4242", 4242, job.id, claim.shard.id)
            seed.jobs["running"] = job.id
            failed = store.create_job(s, spec={"base": BASE}, submitted_by="bob", base_model_id=base.id,
                                      adapter_id=None, dataset_id=live.id, n_samples=24, runs=_specs(["ft"]),
                                      shard_ranges=[(0, 24)])
            store.mark_job_failed(s, failed.id, "could not load the adapter: boom")
            seed.jobs["failed"] = failed.id
    finally:
        engine.dispose()
    return seed


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('dashdb') / 'tad.db'}"
    upgrade(url)
    return seed_database(url)


@pytest.fixture
def app_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., object]]:
    """`app_on(url, page=None)`: an AppTest of dashboard/app.py on database `url`, run (on `page` if given)."""
    from streamlit.testing.v1 import AppTest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    def _open(url: str, page: str | None = None, **env: str) -> AppTest:
        monkeypatch.setenv("TAD_DATABASE_URL", url)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.run()
        if page is not None:
            at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield _open
