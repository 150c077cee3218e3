"""The Study view and the study tables (services.study) on a database seeded through the store functions: two
mixture adapters (train sizes 4 and 32) x two sets x (ft, tad) in the llm-adapters format, numbers recomputed here."""
from __future__ import annotations

from pathlib import Path

import pytest

from tad_core.metrics import holm, mcnemar
from tests.dashboard.conftest import _complete_job

N = 10
TAD = "tad(alpha=1.0,beta=0.0)"
# correctness patterns per (train size, dataset, strategy); None = unparsed (no label in the output)
PATTERNS = {
    (4, "piqa", "ft"): [1, 0, 0, 1, 0, None, None, 0, 1, 0],
    (4, "piqa", TAD): [1, 1, 0, 1, 1, None, 1, 0, 1, 0],
    (4, "boolq", "ft"): [0, 0, 1, 1, 0, 0, 1, 0, 0, None],
    (4, "boolq", TAD): [1, 0, 1, 1, 1, 0, 1, 1, 0, 1],
    (32, "piqa", "ft"): [1, 1, 1, 1, 0, 1, 1, 0, 1, 1],
    (32, "piqa", TAD): [1, 1, 1, 0, 0, 1, 1, 0, 1, None],
    (32, "boolq", "ft"): [1, 1, 1, 1, 1, 0, 1, 0, 1, 1],
    (32, "boolq", TAD): [1, 1, 0, 1, 1, 0, 1, 0, 1, 1],
}


@pytest.fixture
def study_db(tmp_path: Path) -> str:
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    url = f"sqlite:///{tmp_path / 'study.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        base = store.get_or_create_base_model(s, "tiny-base", "/models/tiny-base")
        sets = {name: store.register_dataset(s, name=name, split="val", content_hash=f"h-{name}", task_type="mc",
                                             source="seed", samples=[{"id": f"{name}{i}", "prompt": "q",
                                                                      "choices": ["a", "b"], "answer": 0}
                                                                     for i in range(N)])[0]
                for name in ("piqa", "boolq")}
        for size in (4, 32):
            ad, _ = store.register_adapter(s, name="mix", path=f"/adapters/mix-{size}", method="lora",
                                           sha256=f"{size:02d}" * 32, base_model_id=base.id,
                                           manifest={"mixture": [{"dataset": "piqa"}, {"dataset": "boolq"}],
                                                     "train_size_per_dataset": size, "mean_loss_last_10": 1.5})
            for name, ds in sets.items():
                def row(key: str, i: int, size: int = size, name: str = name) -> dict:
                    ok = PATTERNS[(size, name, key)][i]
                    ft_ok = bool(PATTERNS[(size, name, "ft")][i])
                    return {"sample_id": f"{name}{i}", "output": "x" if ok is None else "the answer is answer1",
                            "extracted": None if ok is None else ("answer1" if ok else "answer2"),
                            "correct": bool(ok), "tokens": 6, "latency_s": 0.1,
                            "vs_ft": None if key == "ft" or bool(ok) == ft_ok else ("fixed" if ok else "broken")}
                _complete_job(s, base_id=base.id, adapter_id=ad.id, dataset_id=ds.id, n=N, keys=["ft", TAD],
                              rows_for=row, spec={"base": "tiny-base", "adapter_label": ad.label,
                                                  "config": {"format": "llm-adapters@1"}})
    engine.dispose()
    return url


def _correct(size: int, name: str, key: str) -> list[bool]:
    return [bool(x) for x in PATTERNS[(size, name, key)]]


def test_study_cells_average_pool_and_holm(study_db: str) -> None:
    from services.db.session import make_engine, session_scope
    from services.study import AVERAGE, markdown_tables, study_cells, study_formats

    with session_scope(make_engine(study_db)) as s:
        assert study_formats(s) == [("tiny-base", "llm-adapters@1")]
        cells = study_cells(s, base="tiny-base", fmt="llm-adapters@1")
        assert study_cells(s, base="tiny-base", fmt="chat@1") == []
    get = {(c.train_size, c.dataset, c.strategy): c for c in cells}
    for size in (4, 32):
        for key in ("ft", TAD):
            per_set = [sum(_correct(size, d, key)) / N for d in ("piqa", "boolq")]
            avg = get[(size, AVERAGE, key)]
            assert avg.acc == pytest.approx(sum(per_set) / 2) and avg.n == 2 * N
            assert avg.unparsed == sum(PATTERNS[(size, d, key)].count(None) for d in ("piqa", "boolq"))
        pooled = mcnemar(sum((_correct(size, d, "ft") for d in ("piqa", "boolq")), []),
                         sum((_correct(size, d, TAD) for d in ("piqa", "boolq")), []))
        avg = get[(size, AVERAGE, TAD)]
        assert (avg.fixed, avg.broken) == (pooled.fixed, pooled.broken)
        assert avg.p == pytest.approx(pooled.p_value) and avg.p_holm == pytest.approx(holm([pooled.p_value])[0])
    table = "\n".join(markdown_tables(cells, ["piqa", "boolq"]))
    assert "**train size 4 per set (mix:1; mean loss of the last 10 steps 1.500)**" in table
    assert f"| {TAD} | 0.600 ± " in table and "| ft | 0.300 ± 0.153 | 0.300 ± 0.153 | 0.300 ± 0.108 | 20 | 3 (15.0%) | - |" in table


def test_study_page_shows_each_train_size(app_on, study_db: str) -> None:
    at = app_on(study_db, "study")
    assert not at.exception
    tables = [t.value for t in at.dataframe]
    assert len(tables) == 2
    small = tables[0]
    assert small.loc[TAD, "piqa"] == pytest.approx(0.6) and small.loc["ft", "boolq"] == pytest.approx(0.3)
    assert small.loc["ft", "unparsed"] == 3 and small.loc[TAD, "fixed"] == 7 and small.loc[TAD, "broken"] == 0
    assert at.get("vega_lite_chart")


def test_study_page_without_study_runs(app_on, tmp_path: Path) -> None:
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    at = app_on(url, "study")
    assert "No study runs yet" in at.info[0].value


def test_two_adapters_of_one_train_size_get_a_table_each(app_on, study_db: str) -> None:
    """A second adapter trained on as many samples (4 per set) was merged into the first one's table: its
    accuracies beside the first adapter's statistics, under the first adapter's name."""
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(study_db)
    with session_scope(engine) as s:
        base = store.get_or_create_base_model(s, "tiny-base", "/models/tiny-base")
        other, _ = store.register_adapter(s, name="mix", path="/adapters/mix-4b", method="lora", sha256="ab" * 32,
                                          base_model_id=base.id,
                                          manifest={"mixture": [{"dataset": "piqa"}, {"dataset": "boolq"}],
                                                    "train_size_per_dataset": 4, "mean_loss_last_10": 1.5})
        for ds in store.list_datasets(s):
            def row(key: str, i: int, name: str = ds.name) -> dict:  # the size-32 adapter's outcomes
                ok = PATTERNS[(32, name, key)][i]
                return {"sample_id": f"{name}{i}", "output": "x" if ok is None else "the answer is answer1",
                        "extracted": None if ok is None else ("answer1" if ok else "answer2"), "correct": bool(ok),
                        "tokens": 6, "latency_s": 0.1, "vs_ft": None}
            _complete_job(s, base_id=base.id, adapter_id=other.id, dataset_id=ds.id, n=N, keys=["ft", TAD],
                          rows_for=row, spec={"base": "tiny-base", "adapter_label": other.label,
                                              "config": {"format": "llm-adapters@1"}})
    engine.dispose()
    at = app_on(study_db, "study")
    heads = [h.value for h in at.subheader if h.value.startswith("Train size")]
    assert heads == ["Train size 4 per set · mix:1", "Train size 4 per set · mix:3", "Train size 32 per set · mix:2"]
    first, second = at.dataframe[0].value, at.dataframe[1].value
    for name in ("piqa", "boolq"):
        assert first.loc["ft", name] == pytest.approx(sum(_correct(4, name, "ft")) / N)
        assert second.loc["ft", name] == pytest.approx(sum(_correct(32, name, "ft")) / N)
