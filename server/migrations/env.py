"""Alembic environment: runs the migrations on the async engine the service itself uses."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from server import db
from server.config import Settings
from server.domain.models import metadata


def _run(connection: Connection, schema: str) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema or None,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate(settings: Settings) -> None:
    engine = db.create_engine(settings)
    schema = "" if db.is_sqlite(settings.database_url) else settings.database_schema
    try:
        async with engine.connect() as connection:
            if schema:
                await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                await connection.commit()
            await connection.run_sync(_run, schema)
            await connection.commit()
    finally:
        await engine.dispose()


settings = context.config.attributes.get("settings") or Settings()
asyncio.run(_migrate(settings))
