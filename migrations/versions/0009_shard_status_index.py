"""An index on `shards.status`: every worker process's periodic sweep looks up the running shards of dead workers
and the queued shards whose message was lost, across all jobs; the `(job_id, status)` index cannot serve that, so
each sweep scanned the whole, ever-growing table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 11:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f('ix_shards_status'), 'shards', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_shards_status'), table_name='shards')
