"""Alembic environment for the metadata store (see :mod:`cape.host.store.metadata`).

The store builds its Alembic config in code (:func:`~cape.host.store.metadata.migration_config`)
and passes its open connection in ``config.attributes["connection"]``, so migrations run in
the store's transaction with its SQLite pragmas. With only ``sqlalchemy.url`` set, this runs
on a fresh engine, or renders SQL in offline mode. ``render_as_batch`` lets later revisions
alter tables on SQLite (which cannot ``ALTER`` most things in place).

To write a revision after changing the models::

    python -c "from alembic import command; from cape.host.store.metadata import \\
        migration_config; c = migration_config(url='sqlite:////tmp/x.db'); \\
        command.upgrade(c, 'head'); command.revision(c, 'what changed', autogenerate=True)"
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

# Registers the invites and throttle tables on Base.
import cape.host.store.invites
import cape.host.store.throttle  # noqa: F401
from cape.host.store.metadata import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    try:
        with engine.connect() as fresh:
            _run(fresh)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
