"""Schema migrations: the alembic environment shipped with the package.

``routemq-outbox migrate`` runs them from an installed package; ``alembic upgrade head`` runs
the same files in a checkout. The revision history lives in its own table
(``routemq_outbox_alembic_version``) so it never collides with an application's alembic.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from .config import database_url

__all__ = [
    "BRANCH",
    "VERSION_TABLE",
    "alembic_config",
    "downgrade",
    "head_revision",
    "migrations_dir",
    "upgrade",
]

VERSION_TABLE = "routemq_outbox_alembic_version"
BRANCH = "routemq_outbox"


def migrations_dir() -> Path:
    """Where the alembic environment is: inside the installed package, or the checkout's."""
    packaged = Path(str(resources.files("routemq_outbox"))) / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise FileNotFoundError("the routemq-outbox migrations are missing from this installation")


def alembic_config(url: str | None = None, *, stdout: TextIO | None = None) -> Config:
    """An alembic Config for our migrations against ``url`` (default: the configured one)."""
    config = Config(stdout=stdout or sys.stdout)
    config.set_main_option("script_location", str(migrations_dir()))
    # configparser interpolation would eat a '%' in a password
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def _outside_event_loop(run: Callable[[], None]) -> None:
    """The alembic environment runs its own event loop: from inside a running one (an async
    app's start-up, say), give it a thread. Prefer ``await asyncio.to_thread(upgrade)``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        run()
        return
    with ThreadPoolExecutor(1, thread_name_prefix="routemq-outbox-migrate") as pool:
        pool.submit(run).result()


def upgrade(
    url: str | None = None,
    revision: str = "head",
    *,
    sql: bool = False,
    stdout: TextIO | None = None,
) -> None:
    """Upgrade the database at ``url`` to ``revision``; with ``sql``, print the DDL instead."""
    config = alembic_config(url, stdout=stdout)
    _outside_event_loop(lambda: command.upgrade(config, revision, sql=sql))


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base`` drops the tables)."""
    config = alembic_config(url)
    _outside_event_loop(lambda: command.downgrade(config, revision))


def head_revision() -> str:
    """The newest revision shipped with this version of routemq-outbox."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head
