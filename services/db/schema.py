"""Alembic from code: upgrade / downgrade / current, and the schema check workers and dashboard run first.

The Alembic Config is built here (script location resolved from this file), so `tad db upgrade` works from any
working directory and no `alembic.ini` needs to be found.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from services.db.session import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code expects."""


def alembic_config(url: str) -> Config:
    """An Alembic Config for `url`, independent of the working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (e.g. "base")."""
    command.downgrade(alembic_config(url), revision)


def ensure_schema_current(engine: Engine) -> None:
    """Raise SchemaOutOfDate (with the command to run) unless the database is at the Alembic head."""
    have, want = current_revision(engine), head_revision()
    if have != want:
        where = engine.url.render_as_string(hide_password=True)
        raise SchemaOutOfDate(
            f"database {where} is at revision {have or '<empty>'}, code expects {want}: run `tad db upgrade`"
        )


def upgrade_if_embedded(url: str) -> None:
    """Embedded SQLite databases are created/migrated on demand; shared databases are never migrated silently."""
    if url.startswith("sqlite"):
        engine = make_engine(url)
        try:
            if current_revision(engine) != head_revision():
                upgrade(url)
        finally:
            engine.dispose()
