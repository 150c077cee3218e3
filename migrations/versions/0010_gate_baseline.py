"""A gate records the baseline it compares with: the version promoted when the gate was queued. It was looked up
again at each planning, so a promotion while the gate ran changed the baseline under it (and the stored gate never
said which one it had used).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 14:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('gate_runs') as batch:
        batch.add_column(sa.Column('baseline_id', sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f('fk_gate_runs_baseline_id_adapters'), 'adapters', ['baseline_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('gate_runs') as batch:
        batch.drop_constraint(op.f('fk_gate_runs_baseline_id_adapters'), type_='foreignkey')
        batch.drop_column('baseline_id')
