"""Stats claims: which process computes a content's stats and its last heartbeat, so several
server processes sharing one catalogue never compute the same stats twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stats_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("stats_heartbeat", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("contents", schema=None) as batch_op:
        batch_op.drop_column("stats_heartbeat")
        batch_op.drop_column("stats_owner")
