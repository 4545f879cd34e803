"""Content identity and the full distribution (issue 15): each tensor's digest (``xxh3-128`` of its
dtype, shape and logical bytes in C order), indexed so the catalogue answers "where else is this
tensor"; a table of module digests (a module's members under their relative names) for the same
question about whole modules; each tensor's init verdict, judged once by the stats job (JSON).
Percentiles and the log-magnitude histogram live in the ``hist`` JSON beside the 64 linear bins.

Statistics computed before this revision have neither, so every content's statistics are marked
pending and computed again by the next server that starts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=48), nullable=True))
        batch_op.add_column(sa.Column("init", sa.Text(), nullable=True))
        batch_op.create_index("ix_tensors_digest", ["digest"], unique=False)
    op.create_table(
        "module_digests",
        sa.Column("content_key", sa.String(length=64), sa.ForeignKey("contents.key"), nullable=False),
        sa.Column("module", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=48), nullable=False),
        sa.Column("tensor_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("content_key", "module"),
    )
    op.create_index("ix_module_digests_digest", "module_digests", ["digest"], unique=False)
    op.execute("UPDATE tensors SET hist = NULL")
    op.execute("UPDATE contents SET stats_state = 'pending', stats_owner = NULL WHERE stats_state <> 'pending'")


def downgrade() -> None:
    op.drop_index("ix_module_digests_digest", table_name="module_digests")
    op.drop_table("module_digests")
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.drop_index("ix_tensors_digest")
        batch_op.drop_column("init")
        batch_op.drop_column("digest")
