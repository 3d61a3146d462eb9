"""Model registry and experiments: model_version, experiment, ab_decision, registry_state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:12:41.861238
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiment",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("salt", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("control", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("ramp", sa.JSON(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experiment_status"), ["status"], unique=False)
        batch_op.create_index(
            "uq_experiment_one_running",
            ["status"],
            unique=True,
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )

    op.create_table(
        "model_version",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("base_model", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("adapter_path", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
        sa.Column("parent", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("dataset_version", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("training_run", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status_reason", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_version_status"), ["status"], unique=False)
        batch_op.create_index(
            "uq_model_version_one_active",
            ["status"],
            unique=True,
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        )

    registry_state = op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(registry_state, [{"id": 1, "revision": 0}])
    op.create_table(
        "ab_decision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("numbers", sa.JSON(), nullable=False),
        sa.Column("weights_before", sa.JSON(), nullable=False),
        sa.Column("weights_after", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["experiment"], ["experiment.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ab_decision", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ab_decision_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_ab_decision_experiment"), ["experiment"], unique=False)

    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_completion_experiment"), ["experiment"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_experiment"))

    with op.batch_alter_table("ab_decision", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ab_decision_experiment"))
        batch_op.drop_index(batch_op.f("ix_ab_decision_created_at"))

    op.drop_table("ab_decision")
    op.drop_table("registry_state")
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_model_version_one_active",
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        )
        batch_op.drop_index(batch_op.f("ix_model_version_status"))

    op.drop_table("model_version")
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_experiment_one_running",
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )
        batch_op.drop_index(batch_op.f("ix_experiment_status"))

    op.drop_table("experiment")
