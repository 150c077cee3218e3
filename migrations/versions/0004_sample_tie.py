"""Sample results record whether a multiple-choice prediction was an all -inf tie (every choice excluded by the
strategy, so the prediction is the tie-break to choice 0): tables count such samples beside the accuracy.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 13:40:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sample_results') as batch:
        batch.add_column(sa.Column('tie', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sample_results') as batch:
        batch.drop_column('tie')
