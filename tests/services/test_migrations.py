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
