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
