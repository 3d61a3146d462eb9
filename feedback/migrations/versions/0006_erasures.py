"""Erasure tombstones: deletions that a later replay of a spool must not undo.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("user_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_erasure_scope"), "erasure", ["scope"], unique=False)
    op.create_index(op.f("ix_erasure_user_hash"), "erasure", ["user_hash"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_erasure_user_hash"), table_name="erasure")
    op.drop_index(op.f("ix_erasure_scope"), table_name="erasure")
    op.drop_table("erasure")
