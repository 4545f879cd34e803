"""What the file says about each tensor (issue 13): where its parameter/buffer label comes from
(``kind_source``), how its bytes decode (``encoding``: GGUF quantisations), its type as the file
spells it (``file_dtype``), the chunks of a stitched torch.distributed.checkpoint tensor
(``pieces``), a torch quantized tensor's scheme (``quant``); per content, the classes of pickled
modules, the pickle report and the parameter each optimizer state tensor belongs to
(``param_of``).

Rows listed before this revision keep their name-guessed kinds (``kind_source`` "name").

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind_source", sa.String(length=8), nullable=False, server_default="name"))
        batch_op.add_column(sa.Column("encoding", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("file_dtype", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("pieces", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("quant", sa.Text(), nullable=True))
    with op.batch_alter_table("contents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("module_types", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("pickle_report", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("param_of", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("contents", schema=None) as batch_op:
        batch_op.drop_column("param_of")
        batch_op.drop_column("pickle_report")
        batch_op.drop_column("module_types")
    with op.batch_alter_table("tensors", schema=None) as batch_op:
        batch_op.drop_column("quant")
        batch_op.drop_column("pieces")
        batch_op.drop_column("file_dtype")
        batch_op.drop_column("encoding")
        batch_op.drop_column("kind_source")
