"""`cacheaside db upgrade`: apply the Alembic migrations to CACHEASIDE_DATABASE_URL."""

from __future__ import annotations

import asyncio
import pathlib

from alembic import command
from alembic.config import Config

from server.config import Settings

_SCRIPTS = pathlib.Path(__file__).resolve().parent / "migrations"


def alembic_config(settings: Settings) -> Config:
    """An Alembic configuration that needs no alembic.ini: the settings travel in its attributes."""
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["settings"] = settings
    return config


def upgrade_sync(settings: Settings, revision: str = "head") -> None:
    """Migrate to revision from a thread with no running event loop (env.py runs its own)."""
    command.upgrade(alembic_config(settings), revision)


async def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate from async code: Alembic's env.py runs its own loop, so it gets a thread of its own."""
    await asyncio.to_thread(upgrade_sync, settings, revision)
