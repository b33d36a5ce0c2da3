"""Schema migrations: the alembic environment shipped with the package.

``routemq-outbox migrate`` runs them from an installed package; ``alembic upgrade head`` runs
the same files in a checkout. The revision history lives in its own table
(``routemq_outbox_alembic_version``) so it never collides with an application's alembic.

An application may instead apply our revisions with its own alembic (``version_locations``
naming ``routemq_outbox:migrations/versions``); they are then recorded in its
``alembic_version``, :func:`upgrade` leaves them to it, and :func:`include_object` keeps our
tables out of its autogenerate.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO, TypeVar

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from .config import database_url
from .errors import ConfigurationError
from .schema import metadata

__all__ = [
    "APP_VERSION_TABLE",
    "BRANCH",
    "TABLES",
    "VERSION_TABLE",
    "Schema",
    "alembic_config",
    "downgrade",
    "head_revision",
    "include_object",
    "migrations_dir",
    "revisions",
    "schema_revision",
    "upgrade",
]

VERSION_TABLE = "routemq_outbox_alembic_version"
APP_VERSION_TABLE = "alembic_version"
"""Where an application's own alembic records our revisions when it applies them itself."""
BRANCH = "routemq_outbox"
TABLES = frozenset({*metadata.tables, VERSION_TABLE})
"""The tables routemq-outbox creates: its migrations alone change them."""

T = TypeVar("T")


def migrations_dir() -> Path:
    """Where the alembic environment is: ``routemq_outbox/migrations``, in a checkout (a link
    to the repository's ``migrations/``), an editable install and a wheel alike."""
    path = Path(str(resources.files("routemq_outbox"))) / "migrations"
    if not (path / "env.py").is_file():
        raise FileNotFoundError("the routemq-outbox migrations are missing from this installation")
    return path


def alembic_config(url: str | None = None, *, stdout: TextIO | None = None) -> Config:
    """An alembic Config for our migrations against ``url`` (default: the configured one)."""
    config = Config(stdout=stdout or sys.stdout)
    config.set_main_option("script_location", str(migrations_dir()))
    # configparser interpolation would eat a '%' in a password
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def _outside_event_loop(run: Callable[[], T]) -> T:
    """The alembic environment runs its own event loop: from inside a running one (an async
    app's start-up, say), give it a thread. Prefer ``await asyncio.to_thread(upgrade)``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with ThreadPoolExecutor(1, thread_name_prefix="routemq-outbox-migrate") as pool:
        return pool.submit(run).result()


@functools.cache
def _revisions() -> tuple[str, ...]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return tuple(rev.revision for rev in reversed(list(script.walk_revisions())))


def revisions() -> list[str]:
    """Our revisions, oldest first."""
    return list(_revisions())


def head_revision() -> str:
    """The newest revision shipped with this version of routemq-outbox."""
    return revisions()[-1]


@dataclass(frozen=True)
class Schema:
    """Which of our revisions a database is at (None: none), and the table recording it:
    ours, or the application's ``alembic_version`` when its alembic applies our revisions."""

    revision: str | None
    table: str = VERSION_TABLE

    @property
    def at_head(self) -> bool:
        return self.revision == head_revision()

    @property
    def embedded(self) -> bool:
        return self.table == APP_VERSION_TABLE


def schema_revision(url: str | None = None, *, create_file: bool = False) -> Schema:
    """Read from the database which of our revisions it is at (``create_file``: make a
    missing SQLite file, empty, as :func:`upgrade` is about to)."""
    from . import sql
    from .database import create_engine

    ours = revisions()

    async def read() -> dict[str, list[str]]:
        engine = create_engine(url or database_url(), poolclass=NullPool, create_file=create_file)
        try:
            return await sql.stored_revisions(engine, [VERSION_TABLE, APP_VERSION_TABLE])
        finally:
            await engine.dispose()

    found = _outside_event_loop(lambda: asyncio.run(read()))
    for table in (VERSION_TABLE, APP_VERSION_TABLE):
        known = [rev for rev in found.get(table, []) if rev in ours]
        if known:
            return Schema(max(known, key=ours.index), table)
        if found.get(table) and table == VERSION_TABLE:
            return Schema(found[table][0], table)  # not one of ours: a newer routemq-outbox's
    return Schema(None)


def _target(revision: str) -> str:
    ours = revisions()
    if revision == "head":
        return ours[-1]
    if revision in ours:
        return revision
    listed = ", ".join(ours)
    if revision.startswith(("-", "+")) or revision in ("base", "heads") or "@" in revision:
        raise ConfigurationError(
            f"migrate goes to head or to one of {listed}, and only upgrades; got {revision!r} "
            "(to go back, call routemq_outbox.migrate.downgrade())"
        )
    raise ConfigurationError(f"unknown revision {revision!r}: routemq-outbox has {listed}")


def upgrade(
    url: str | None = None,
    revision: str = "head",
    *,
    sql: bool = False,
    stdout: TextIO | None = None,
) -> Schema | None:
    """Upgrade the database at ``url`` to ``revision`` (``head`` or one of :func:`revisions`)
    and return what it is at then, as read back from it; with ``sql``, print the DDL instead
    (from an empty database) and return None.

    Raises :class:`~routemq_outbox.errors.ConfigurationError`, changing nothing, for any other
    revision, for one older than the database's (this only upgrades: see :func:`downgrade`),
    and when the application's alembic applies our revisions but has not reached
    ``revision`` (it has to: two histories of the same tables would diverge).
    """
    target = _target(revision)
    config = alembic_config(url, stdout=stdout)
    if sql:
        _outside_event_loop(lambda: command.upgrade(config, target, sql=True))
        return None
    ours = revisions()
    before = schema_revision(url, create_file=True)
    if before.revision is not None and before.revision not in ours:
        raise ConfigurationError(
            f"the database is at revision {before.revision}, which this routemq-outbox does not "
            f"know (its newest is {ours[-1]}): upgrade routemq-outbox"
        )
    if before.revision is not None and ours.index(before.revision) >= ours.index(target):
        if before.revision != target and not before.embedded:
            raise ConfigurationError(
                f"the database is at {before.revision}, past {target}: migrate only upgrades "
                "(to go back, call routemq_outbox.migrate.downgrade())"
            )
        return before
    if before.embedded:
        raise ConfigurationError(
            f"your application's alembic applies routemq-outbox's migrations ({APP_VERSION_TABLE} "
            f"is at {before.revision}): run `alembic upgrade heads` there to reach {target}"
        )
    _outside_event_loop(lambda: command.upgrade(config, target))
    return schema_revision(url)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base`` drops the tables)."""
    config = alembic_config(url)
    _outside_event_loop(lambda: command.downgrade(config, revision))


def include_object(
    object_: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """An alembic ``include_object`` hook for your application's ``env.py``::

        from routemq_outbox.migrate import include_object

        context.configure(..., include_object=include_object)

    Its autogenerate then leaves routemq-outbox's tables (``jobs``, ``failed_jobs``, our version
    table), their columns, indexes and constraints alone: our own revisions create and change
    them. To combine it with a hook of your own, include what both include.
    """
    table = name if type_ == "table" else getattr(getattr(object_, "table", None), "name", None)
    return table not in TABLES
