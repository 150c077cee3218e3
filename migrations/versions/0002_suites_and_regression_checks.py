"""Regression gates: suites (named, versioned evaluation sets) and regression checks (tad regress verdicts).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 04:08:36.353136
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('suites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('version >= 1', name=op.f('ck_suites_version_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suites')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_suites_name_version'))
    )
    op.create_table('regression_checks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('suite_id', sa.Integer(), nullable=False),
    sa.Column('candidate_id', sa.Integer(), nullable=False),
    sa.Column('baseline_id', sa.Integer(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('min_effect', sa.Float(), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('rows', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("verdict IN ('passed', 'regressed')", name=op.f('ck_regression_checks_verdict')),
    sa.ForeignKeyConstraint(['baseline_id'], ['adapters.id'], name=op.f('fk_regression_checks_baseline_id_adapters')),
    sa.ForeignKeyConstraint(['candidate_id'], ['adapters.id'], name=op.f('fk_regression_checks_candidate_id_adapters')),
    sa.ForeignKeyConstraint(['suite_id'], ['suites.id'], name=op.f('fk_regression_checks_suite_id_suites')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_regression_checks'))
    )
    op.create_index(op.f('ix_regression_checks_candidate_id'), 'regression_checks', ['candidate_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_regression_checks_candidate_id'), table_name='regression_checks')
    op.drop_table('regression_checks')
    op.drop_table('suites')
