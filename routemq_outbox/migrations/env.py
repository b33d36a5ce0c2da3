"""Alembic environment of routemq-outbox.

The URL is ``sqlalchemy.url`` when set (``routemq-outbox migrate`` sets it), else the configured
database (ROUTEMQ_OUTBOX_DATABASE_URL, DATABASE_URL, then the SQLite default). A caller may
also pass an open connection as ``config.attributes["connection"]``.
"""

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from routemq_outbox.config import database_url, sync_url
from routemq_outbox.database import create_engine
from routemq_outbox.migrate import VERSION_TABLE
from routemq_outbox.schema import include_object, metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or database_url()


def run_offline() -> None:
    context.configure(
        url=sync_url(url),
        target_metadata=metadata,
        include_object=include_object(sync_url(url).get_dialect().name),
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=include_object(connection.dialect.name),
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
elif config.attributes.get("connection") is not None:
    run_on(config.attributes["connection"])
else:
    asyncio.run(run_online())
