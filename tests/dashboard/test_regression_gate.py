"""The regression page shows the verdicts `tad regress` stored (regression_checks) for the chosen family."""
from __future__ import annotations

from pathlib import Path

from tests.dashboard.conftest import FAMILY, seed_database


def test_regression_page_shows_stored_gate_verdicts(app_on, tmp_path: Path) -> None:
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    seed_database(url)
    engine = make_engine(url)
    rows = [{"dataset": "toy-mc", "split": "val", "limit": 20, "strategy": "ft", "n": 20, "baseline_acc": 0.5,
             "candidate_acc": 0.1, "diff": -0.4, "ci_low": -0.6, "ci_high": -0.2, "p_value": 0.0078, "fixed": 0,
             "broken": 8, "verdict": "regressed"}]
    with session_scope(engine) as s:
        suite, _ = store.add_suite(s, name="smoke", version=3, spec={}, sha256="s" * 64)
        v1, v2 = (store.find_adapter(s, FAMILY, v) for v in (1, 2))
        store.record_regression_check(s, suite_id=suite.id, candidate_id=v2.id, baseline_id=v1.id, alpha=0.05,
                                      min_effect=0.01, verdict="regressed", rows=rows)
    engine.dispose()
    at = app_on(url, "regression")
    assert any("Gate verdicts" in h.value for h in at.subheader)
    checks = next(d.value for d in at.dataframe if "suite" in d.value.columns)
    assert checks.iloc[0][["candidate", "baseline", "suite", "verdict", "regressed"]].tolist() == [
        f"{FAMILY}:2", f"{FAMILY}:1", "smoke:3", "regressed", "toy-mc/ft"]
    detail = next(d.value for d in at.dataframe if "candidate_acc" in d.value.columns)
    assert detail.iloc[0]["diff"] == -0.4 and detail.iloc[0]["p_value"] == 0.0078


def test_regression_page_shows_each_versions_gate_as_it_lands(app_on, tmp_path: Path) -> None:
    """Gates queued at registration: the versions table names each version's newest gate per suite, and the
    gates table their status, check and error; a verdict that lands shows on the next render."""
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    seed_database(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        suite, _ = store.add_suite(s, name="smoke", version=1, spec={}, sha256="s" * 64)
        v1, v2 = (store.find_adapter(s, FAMILY, v) for v in (1, 2))
        gate = store.create_gate_run(s, candidate_id=v2.id, suite_id=suite.id, alpha=0.05, min_effect=0.01)
        store.move_gate_run(s, gate.id, "queued", "running", job_ids=[])
    at = app_on(url, "regression")
    versions = next(d.value for d in at.dataframe if "promoted" in d.value.columns)
    assert versions.set_index("version").loc[2, "gates"] == "smoke:1 running"
    assert versions.set_index("version").loc[1, "gates"] == "-"
    gates = next(d.value for d in at.dataframe if "gate" in d.value.columns)
    assert gates.iloc[0][["candidate", "suite", "status"]].tolist() == [f"{FAMILY}:2", "smoke:1", "running"]

    with session_scope(engine) as s:
        check = store.record_regression_check(s, suite_id=suite.id, candidate_id=v2.id, baseline_id=v1.id,
                                              alpha=0.05, min_effect=0.01, verdict="passed", rows=[])
        assert store.move_gate_run(s, gate.id, "running", "passed", check_id=check)
    engine.dispose()
    from dashboard import data

    data.clear_caches()  # what the one-second live cache (data.LIVE_TTL) does by itself between renders
    at.run()
    versions = next(d.value for d in at.dataframe if "promoted" in d.value.columns)
    assert versions.set_index("version").loc[2, "gates"] == "smoke:1 passed"
    gates = next(d.value for d in at.dataframe if "gate" in d.value.columns)
    assert gates.iloc[0][["status", "check"]].tolist() == ["passed", check]
