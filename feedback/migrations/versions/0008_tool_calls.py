"""Tools with completions: the tools a request offered and the tool calls the answer made.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 23:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("completion") as batch:
        batch.add_column(sa.Column("tools", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tool_calls", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("completion") as batch:
        batch.drop_column("tool_calls")
        batch.drop_column("tools")
