"""A per-sample result may record why the sample failed (over a budget, or its evaluation raised), so that one
poisoned sample fails alone instead of failing its shard.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:50:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sample_results') as batch:
        batch.add_column(sa.Column('error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sample_results') as batch:
        batch.drop_column('error')
