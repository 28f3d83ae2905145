"""`cacheaside serve --demo`: migrate and seed an empty database so the service has data to serve."""

from __future__ import annotations

import logging

from server import db
from server.config import Settings
from server.migrate import upgrade
from server.seed import SeedCounts, is_empty, seed

_LOGGER = logging.getLogger(__name__)
DEMO_COUNTS = SeedCounts(users=1000, posts=10_000, comments=20_000)


async def prepare_demo_database(settings: Settings) -> None:
    """Migrate; seed the demo data if the database has no users yet."""
    await upgrade(settings)
    engine = db.create_engine(settings)
    try:
        if await is_empty(engine):
            _LOGGER.info("seeding the demo database: %s", DEMO_COUNTS)
            await seed(engine, DEMO_COUNTS, progress=False)
    finally:
        await engine.dispose()
