"""Per-shard partial sums of the run metrics (`shard_aggregates`), so a run's aggregates are refreshed by adding
up its shards' partials instead of reading every stored row; backfilled from the stored `sample_results`, one
partial per (run, shard range of the `shards` table).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 22:10:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('shard_aggregates',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_shard_aggregates_run_id_runs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'start', 'name', name=op.f('pk_shard_aggregates'))
    )
    _backfill()


def _backfill() -> None:
    """The partials of the rows already stored, computed by the write path's own SQL
    (`services.db.aggregates.rebuild_partials`, one home for it) over the migration's connection and transaction.
    It reads only columns that exist at this revision (runs, shards, sample_results as of 0005)."""
    from services.db.aggregates import rebuild_partials
    from services.db.models import Run

    session = Session(bind=op.get_bind())
    try:
        rebuild_partials(session, list(session.scalars(sa.select(Run.id))))
    finally:
        session.close()


def downgrade() -> None:
    op.drop_table('shard_aggregates')
