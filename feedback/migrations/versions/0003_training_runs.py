"""Retraining: training_run, training_sample, retrain_lock.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 13:39:54.134406
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    retrain_lock = op.create_table(
        "retrain_lock",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(retrain_lock, [{"name": "retrain", "owner": None, "expires_at": None}])
    op.create_table(
        "training_run",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("trigger", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("method", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("champion", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("candidate", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("dataset_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("durations", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=2048), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_run_started_at"), ["started_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_run_status"), ["status"], unique=False)

    op.create_table(
        "training_sample",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("completion_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completion.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["training_run.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_sample", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_sample_completion_id"), ["completion_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_sample_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("training_sample", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_sample_run_id"))
        batch_op.drop_index(batch_op.f("ix_training_sample_completion_id"))

    op.drop_table("training_sample")
    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_run_status"))
        batch_op.drop_index(batch_op.f("ix_training_run_started_at"))

    op.drop_table("training_run")
    op.drop_table("retrain_lock")
