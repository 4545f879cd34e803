"""Alembic environment: migrations run on the connection ckptscope.store.migrate hands over."""

from __future__ import annotations

from alembic import context

from ckptscope.store.catalogue import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through ckptscope.store.migrate (ckptscope migrate), which supplies the connection"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
