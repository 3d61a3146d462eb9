"""Imported transcripts: completion.source, import_batch and origin_id, the import_batch table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 18:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "import_batch",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
        sa.Column("file_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("format", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("cleaning", sa.JSON(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_import_batch_source"), "import_batch", ["source"], unique=False)
    op.create_index(op.f("ix_import_batch_file_sha256"), "import_batch", ["file_sha256"], unique=False)
    op.create_index(op.f("ix_import_batch_started_at"), "import_batch", ["started_at"], unique=False)
    with op.batch_alter_table("completion") as batch:
        batch.add_column(
            sa.Column(
                "source",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                nullable=False,
                server_default="live",
            )
        )
        batch.add_column(
            sa.Column("import_batch", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch.add_column(sa.Column("origin_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_foreign_key(
            "fk_completion_origin_id", "completion", ["origin_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_index(batch.f("ix_completion_source"), ["source"], unique=False)
        batch.create_index(batch.f("ix_completion_import_batch"), ["import_batch"], unique=False)
        batch.create_index(batch.f("ix_completion_origin_id"), ["origin_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("completion") as batch:
        batch.drop_index(batch.f("ix_completion_origin_id"))
        batch.drop_index(batch.f("ix_completion_import_batch"))
        batch.drop_index(batch.f("ix_completion_source"))
        batch.drop_constraint("fk_completion_origin_id", type_="foreignkey")
        batch.drop_column("origin_id")
        batch.drop_column("import_batch")
        batch.drop_column("source")
    op.drop_index(op.f("ix_import_batch_started_at"), table_name="import_batch")
    op.drop_index(op.f("ix_import_batch_file_sha256"), table_name="import_batch")
    op.drop_index(op.f("ix_import_batch_source"), table_name="import_batch")
    op.drop_table("import_batch")
