"""Serving replicas: what each serving process reports it serves (live weights, LoRA room).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "serving_replica",
        sa.Column("replica", sa.String(length=255), nullable=False),
        sa.Column("active_version", sa.String(length=128), nullable=False),
        sa.Column("live_version", sa.String(length=128), nullable=False),
        sa.Column("weights_path", sa.String(length=1024), nullable=False),
        sa.Column("lora_slots", sa.Integer(), nullable=False),
        sa.Column("lora_max_rank", sa.Integer(), nullable=False),
        sa.Column("lora_versions", sa.JSON(), nullable=False),
        sa.Column("registry_revision", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replica"),
    )
    op.create_index("ix_serving_replica_updated_at", "serving_replica", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_serving_replica_updated_at", table_name="serving_replica")
    op.drop_table("serving_replica")
