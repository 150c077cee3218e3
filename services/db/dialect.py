"""SQL the two supported dialects (Postgres, SQLite) spell differently: upserts and row locks."""
from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def dialect_insert(session: Session, table: Any) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are implemented for Postgres and SQLite, not {name}")


def locked(session: Session, stmt: Any) -> Any:
    """SELECT ... FOR UPDATE where the dialect has it (SQLite serialises writers anyway)."""
    return stmt.with_for_update() if session.get_bind().dialect.name == "postgresql" else stmt
