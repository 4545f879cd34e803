"""Initial schema: contents, checkpoints, tensors (with cached stats), file refs, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contents",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=40), nullable=False),
        sa.Column("default_root", sa.Text(), nullable=False),
        sa.Column("roots", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("tensor_count", sa.Integer(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stats_state", sa.String(length=16), nullable=False),
        sa.Column("stats_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("content_key", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_content_key"), ["content_key"], unique=False)

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("content_key", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["content_key"],
            ["contents.key"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_content_key"), ["content_key"], unique=False)

    op.create_table(
        "file_refs",
        sa.Column("content_key", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["content_key"],
            ["contents.key"],
        ),
        sa.PrimaryKeyConstraint("content_key", "name"),
    )
    with op.batch_alter_table("file_refs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_file_refs_sha256"), ["sha256"], unique=False)

    op.create_table(
        "tensors",
        sa.Column("content_key", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("dtype", sa.String(length=20), nullable=False),
        sa.Column("shape", sa.Text(), nullable=False),
        sa.Column("stride", sa.Text(), nullable=False),
        sa.Column("numel", sa.BigInteger(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("alias_of", sa.Text(), nullable=True),
        sa.Column("file_sha", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column("storage_byte_offset", sa.BigInteger(), nullable=False),
        sa.Column("storage_nbytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_offset", sa.BigInteger(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=True),
        sa.Column("std", sa.Float(), nullable=True),
        sa.Column("min", sa.Float(), nullable=True),
        sa.Column("max", sa.Float(), nullable=True),
        sa.Column("l2", sa.Float(), nullable=True),
        sa.Column("absmax", sa.Float(), nullable=True),
        sa.Column("zeros", sa.BigInteger(), nullable=True),
        sa.Column("nan", sa.BigInteger(), nullable=True),
        sa.Column("inf", sa.BigInteger(), nullable=True),
        sa.Column("hist", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["content_key"],
            ["contents.key"],
        ),
        sa.PrimaryKeyConstraint("content_key", "position"),
    )
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.create_index("ix_tensors_content_name", ["content_key", "name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.drop_index("ix_tensors_content_name")

    op.drop_table("tensors")
    with op.batch_alter_table("file_refs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_file_refs_sha256"))

    op.drop_table("file_refs")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_content_key"))

    op.drop_table("checkpoints")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_content_key"))

    op.drop_table("jobs")
    op.drop_table("contents")
