"""Conversation log and ratings: conversation, completion, rating, rating_event, preference.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 16:13:59.899562
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversation",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("user_key", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("conversation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_conversation_last_active_at"), ["last_active_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_conversation_user_key"), ["user_key"], unique=False)

    op.create_table(
        "completion",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("conversation_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("user_key", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("experiment", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("pair_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("prompt_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("response", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("finish_reason", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("logprob_mean", sa.Float(), nullable=True),
        sa.Column("logprob_min", sa.Float(), nullable=True),
        sa.Column("error", sa.String(length=1024), nullable=True),
        sa.Column("redacted", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_completion_conversation_id"), ["conversation_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_completion_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_completion_model_version"), ["model_version"], unique=False)
        batch_op.create_index(batch_op.f("ix_completion_pair_id"), ["pair_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_completion_prompt_hash"), ["prompt_hash"], unique=False)
        batch_op.create_index(batch_op.f("ix_completion_user_key"), ["user_key"], unique=False)

    op.create_table(
        "preference",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_key", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("chosen_completion_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("rejected_completion_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("user_key", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["chosen_completion_id"], ["completion.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["rejected_completion_id"], ["completion.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pair_key", "user_key", name="uq_preference_pair_user"),
    )
    with op.batch_alter_table("preference", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_preference_chosen_completion_id"), ["chosen_completion_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_preference_rejected_completion_id"), ["rejected_completion_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_preference_updated_at"), ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_preference_user_key"), ["user_key"], unique=False)

    op.create_table(
        "rating",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("completion_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("user_key", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("thumb", sqlmodel.sql.sqltypes.AutoString(length=4), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("correction", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completion.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("completion_id", "user_key", name="uq_rating_completion_user"),
    )
    with op.batch_alter_table("rating", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rating_updated_at"), ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rating_user_key"), ["user_key"], unique=False)

    op.create_table(
        "rating_event",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("completion_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("user_key", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("thumb", sqlmodel.sql.sqltypes.AutoString(length=4), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("correction", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completion.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rating_event", schema=None) as batch_op:
        batch_op.create_index("ix_rating_event_completion_user", ["completion_id", "user_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_rating_event_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rating_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rating_event_created_at"))
        batch_op.drop_index("ix_rating_event_completion_user")

    op.drop_table("rating_event")
    with op.batch_alter_table("rating", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rating_user_key"))
        batch_op.drop_index(batch_op.f("ix_rating_updated_at"))

    op.drop_table("rating")
    with op.batch_alter_table("preference", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_preference_user_key"))
        batch_op.drop_index(batch_op.f("ix_preference_updated_at"))
        batch_op.drop_index(batch_op.f("ix_preference_rejected_completion_id"))
        batch_op.drop_index(batch_op.f("ix_preference_chosen_completion_id"))

    op.drop_table("preference")
    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_user_key"))
        batch_op.drop_index(batch_op.f("ix_completion_prompt_hash"))
        batch_op.drop_index(batch_op.f("ix_completion_pair_id"))
        batch_op.drop_index(batch_op.f("ix_completion_model_version"))
        batch_op.drop_index(batch_op.f("ix_completion_created_at"))
        batch_op.drop_index(batch_op.f("ix_completion_conversation_id"))

    op.drop_table("completion")
    with op.batch_alter_table("conversation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_conversation_user_key"))
        batch_op.drop_index(batch_op.f("ix_conversation_last_active_at"))

    op.drop_table("conversation")
