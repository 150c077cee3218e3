"""Migrations are tested on both dialects: upgrade an empty DB, compare with the models, walk down and up."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from services.db.models import Base
from services.db.schema import (SchemaOutOfDate, current_revision, downgrade, ensure_schema_current, head_revision,
                                upgrade)
from services.db.session import make_engine


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_walks_down_and_up(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="run `tad db upgrade`"):
            ensure_schema_current(engine)
        upgrade(db_url)
        assert current_revision(engine) == head_revision()
        ensure_schema_current(engine)
        assert _diff(db_url) == []

        downgrade(db_url, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        upgrade(db_url)
        assert _diff(db_url) == []
        ensure_schema_current(engine)
    finally:
        engine.dispose()


def test_out_of_date_message_names_both_revisions(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    downgrade(sqlite_url, "base")
    engine = make_engine(sqlite_url)
    with pytest.raises(SchemaOutOfDate) as err:
        ensure_schema_current(engine)
    assert "<empty>" in str(err.value) and head_revision() in str(err.value)
    engine.dispose()


def test_sqlite_walk_down_and_up_keeps_every_row(tmp_path) -> None:
    """SQLite alters a table by copy + drop: with foreign keys enforced, recreating `jobs` (0006) or
    `sample_results` cascaded and deleted the runs and results of an embedded database. Walk a seeded database
    down past every table-altering revision and back: every row is still there."""
    from sqlalchemy import text

    from services.db.schema import downgrade, upgrade
    from services.db.session import dispose_engines, make_engine
    from tests.dashboard.conftest import seed_database

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    upgrade(url)
    seed_database(url)
    tables = ("jobs", "runs", "sample_results", "run_aggregates", "shards")

    def counts() -> dict[str, int]:
        engine = make_engine(url)
        with engine.connect() as conn:
            out = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        engine.dispose()
        return out

    before = counts()
    assert before["runs"] > 0 and before["sample_results"] > 0
    downgrade(url, "0003")
    upgrade(url)
    dispose_engines()
    assert counts() == before
    _assert_backfilled_partials_give_the_reference(url)


def _assert_backfilled_partials_give_the_reference(url: str) -> None:
    """The partials 0008 backfilled (the in-flight job's stored rows included) refresh every run to the numbers
    of the Python reference that reads every row."""
    import pytest
    from sqlalchemy import delete, select

    from services.db import aggregates, store
    from services.db.models import Run, RunAggregate, ShardAggregate
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    tables = {}
    for name, refresh in (("partials", aggregates.refresh_aggregates), ("reference", store.refresh_aggregates)):
        with session_scope(engine) as s:
            s.execute(delete(RunAggregate))
            refresh(s, list(s.scalars(select(Run.id))))
            tables[name] = {(r, m): (v, se, n) for r, m, v, se, n in s.execute(
                select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr,
                       RunAggregate.n))}
            assert s.scalar(select(ShardAggregate.run_id).limit(1)) is not None
    engine.dispose()
    assert tables["partials"].keys() == tables["reference"].keys() and tables["partials"]
    def close(x: float | None, y: float | None) -> bool:
        return x == y if x is None or y is None else x == pytest.approx(y, rel=1e-9)

    for key, want in tables["reference"].items():
        got = tables["partials"][key]
        assert got[2] == want[2] and close(got[0], want[0]) and close(got[1], want[1]), (key, got, want)
