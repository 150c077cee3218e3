"""SQL the two supported dialects (Postgres, SQLite) spell differently: upserts, row locks and the clock."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
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


def db_now(session: Session) -> datetime:
    """The time on the clock every process of a deployment shares: the database server's on Postgres.

    Heartbeats, shard starts and job creation are written by different machines and compared by others (a sweep
    takes a worker whose `last_seen` is older than `TAD_WORKER_DEAD_AFTER` for dead). With each machine's own
    clock, a worker whose clock ran a minute behind looked dead to every sweep and its running shard was started
    again elsewhere; with one clock the comparison holds whatever the hosts' clocks say. An embedded SQLite
    database is used by processes of one host, whose clock they share.
    """
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.clock_timestamp()))
    return datetime.now(timezone.utc)


def db_cutoff(session: Session, age_s: float) -> datetime:
    """The database's time `age_s` seconds ago: what is older is stale, on the clock every process shares."""
    return db_now(session) - timedelta(seconds=age_s)
