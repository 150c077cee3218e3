"""Gates that evaluate new adapter versions on the workers: each family's default gate suites and one row per
queued gate (status, jobs, the stored check once the verdict lands).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 16:20:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('adapter_families',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('gate_suites', JSON, nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_adapter_families'))
    )
    op.create_table('gate_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('candidate_id', sa.Integer(), nullable=False),
    sa.Column('suite_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('min_effect', sa.Float(), nullable=False),
    sa.Column('job_ids', JSON, nullable=False),
    sa.Column('check_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('submitted_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'finishing', 'passed', 'regressed', 'error')",
                       name=op.f('ck_gate_runs_status')),
    sa.ForeignKeyConstraint(['candidate_id'], ['adapters.id'], name=op.f('fk_gate_runs_candidate_id_adapters')),
    sa.ForeignKeyConstraint(['check_id'], ['regression_checks.id'],
                            name=op.f('fk_gate_runs_check_id_regression_checks')),
    sa.ForeignKeyConstraint(['suite_id'], ['suites.id'], name=op.f('fk_gate_runs_suite_id_suites')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gate_runs'))
    )
    op.create_index(op.f('ix_gate_runs_candidate_id'), 'gate_runs', ['candidate_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_gate_runs_candidate_id'), table_name='gate_runs')
    op.drop_table('gate_runs')
    op.drop_table('adapter_families')
