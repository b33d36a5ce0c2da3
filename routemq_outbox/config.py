"""Settings read from the environment. Pure functions: nothing here opens a connection.

``ROUTEMQ_OUTBOX_DATABASE_URL`` names the ``"default"`` connection, falling back to
``DATABASE_URL`` and then to an SQLite file in the working directory. Further named connections
(the ``connection=`` argument of the dispatch API) come from
``ROUTEMQ_OUTBOX_DATABASE_URL_<NAME>``, e.g. ``ROUTEMQ_OUTBOX_DATABASE_URL_REPORTING`` for
``connection="reporting"``.

Code written for RouteMQ names its SQL driver ``connection="database"``: that name means the
default connection unless ``ROUTEMQ_OUTBOX_DATABASE_URL_DATABASE`` names another database.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_CONNECTION",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MQTT_QUEUE",
    "async_url",
    "database_url",
    "dialect_family",
    "imports_from_env",
    "max_payload_bytes",
    "notify_enabled",
    "redact",
    "sync_url",
]

DEFAULT_CONNECTION = "default"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///routemq_outbox.db"
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MQTT_QUEUE = "mqtt"
"""The queue of the MQTT outbox (routemq_outbox.mqtt): its worker needs no --import."""

ENV_DATABASE_URL = "ROUTEMQ_OUTBOX_DATABASE_URL"
ENV_FALLBACK_DATABASE_URL = "DATABASE_URL"
ENV_MAX_PAYLOAD_BYTES = "ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES"
ENV_NOTIFY = "ROUTEMQ_OUTBOX_NOTIFY"
ENV_IMPORT = "ROUTEMQ_OUTBOX_IMPORT"

# backend family -> (async driver, sync driver) used when the URL names none or the wrong kind
_DRIVERS: dict[str, tuple[str, str]] = {
    "postgresql": ("asyncpg", "psycopg"),
    "sqlite": ("aiosqlite", "pysqlite"),
    "mysql": ("asyncmy", "pymysql"),
}
_ASYNC_DRIVERS = {"asyncpg", "psycopg", "aiosqlite", "asyncmy", "aiomysql"}
_SYNC_DRIVERS = {"psycopg", "psycopg2", "pysqlite", "pymysql", "mysqldb"}
_FAMILY = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mysql",
}
# RouteMQ's queue driver names, so that code written for RouteMQ runs unchanged or says why not.
ROUTEMQ_SQL_CONNECTION = "database"
ROUTEMQ_OTHER_CONNECTIONS = {"redis": "Redis"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def database_url(
    connection: str = DEFAULT_CONNECTION, environ: Mapping[str, str] | None = None
) -> str:
    """The URL configured for ``connection`` (``"default"`` unless named)."""
    env = _env(environ)
    if connection == DEFAULT_CONNECTION:
        return (
            env.get(ENV_DATABASE_URL) or env.get(ENV_FALLBACK_DATABASE_URL) or DEFAULT_DATABASE_URL
        )
    variable = ENV_DATABASE_URL + "_" + re.sub(r"[^0-9A-Za-z]", "_", connection).upper()
    url = env.get(variable)
    if not url and connection == ROUTEMQ_SQL_CONNECTION:
        return database_url(DEFAULT_CONNECTION, env)
    if not url and connection in ROUTEMQ_OTHER_CONNECTIONS:
        raise ConfigurationError(
            f"connection {connection!r} is RouteMQ's {ROUTEMQ_OTHER_CONNECTIONS[connection]} "
            "driver, which routemq-outbox cannot serve: jobs live in your SQL database. Leave "
            f"connection= out to use the default database, or set {variable} to the database "
            f"URL that jobs pushed to {connection!r} should go to"
        )
    if not url:
        raise ConfigurationError(
            f"unknown connection {connection!r}: set {variable} to its database URL"
        )
    return url


def _parse(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(f"invalid database URL {redact(url)!r}: {exc}") from None
    if parsed.port is not None and not 0 < parsed.port < 65536:
        # Otherwise the driver's OverflowError surfaces deep inside the first connection.
        raise ConfigurationError(
            f"invalid database URL {redact(parsed)!r}: port {parsed.port} is not between 1 "
            "and 65535"
        )
    if parsed.get_backend_name() not in _FAMILY:
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact(parsed)!r}: "
            "routemq-outbox supports postgresql, sqlite, mysql and mariadb"
        )
    return parsed


def dialect_family(url: str | URL) -> str:
    """``postgresql``, ``sqlite`` or ``mysql`` (MariaDB included)."""
    return _FAMILY[_parse(url).get_backend_name()]


def _with_driver(url: str | URL, *, asynchronous: bool) -> URL:
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    family = _FAMILY[backend]
    driver = parsed.get_driver_name() if "+" in parsed.drivername else ""
    wanted = _ASYNC_DRIVERS if asynchronous else _SYNC_DRIVERS
    if driver not in wanted:
        driver = _DRIVERS[family][0 if asynchronous else 1]
    name = "postgresql" if backend == "postgres" else backend
    parsed = parsed.set(drivername=f"{name}+{driver}")
    if family == "mysql" and "charset" not in parsed.query:
        # Payloads are UTF-8 JSON and may hold any character (emoji included).
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def async_url(url: str | URL) -> URL:
    """The URL with an asyncio driver (``postgresql://`` becomes ``postgresql+asyncpg://``;
    ``mysql://`` and ``mariadb://`` get asyncmy and ``charset=utf8mb4``)."""
    return _with_driver(url, asynchronous=True)


def sync_url(url: str | URL) -> URL:
    """The URL with a blocking driver, for the ``*_sync`` dispatch twins (PyMySQL on MySQL)."""
    return _with_driver(url, asynchronous=False)


# Query parameters that carry secrets: ``?password=…`` is a valid way to give asyncpg and
# psycopg the password, and ``sslpassword`` unlocks a client key.
_SECRET_PARAMETER = re.compile(
    r"([?&][^=&#]*(?:pass|pwd|secret|token)[^=&#]*=)[^&#]*", flags=re.IGNORECASE
)


def _hide_credentials(text: str) -> str:
    """Hide whatever sits between ``user:`` and the *last* ``@`` of the authority, and the
    values of secret query parameters.

    The last ``@``, not the first: an unescaped ``@`` in a password makes URL parsers take the
    rest of the password for the host name, which would otherwise be printed.
    """
    at = text.rfind("@")
    if at != -1:
        scheme = text.find("://")
        start = scheme + 3 if 0 <= scheme < at else 0
        user, colon, _ = text[start:at].partition(":")
        if colon:
            text = f"{text[:start]}{user}:***{text[at:]}"
    return _SECRET_PARAMETER.sub(r"\1***", text)


def redact(url: str | URL) -> str:
    """The URL with its password (and secret query parameters) replaced by ``***``; safe to
    log or print, even when the URL is malformed."""
    if isinstance(url, URL):
        return _hide_credentials(url.render_as_string(hide_password=True))
    try:
        text = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        text = url
    return _hide_credentials(text)


def max_payload_bytes(environ: Mapping[str, str] | None = None) -> int:
    """Largest payload accepted at dispatch, in bytes of UTF-8 JSON."""
    raw = _env(environ).get(ENV_MAX_PAYLOAD_BYTES)
    if raw is None or raw == "":
        return DEFAULT_MAX_PAYLOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigurationError(f"{ENV_MAX_PAYLOAD_BYTES} must be a positive integer, got {raw!r}")
    return value


def notify_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether dispatch on PostgreSQL sends NOTIFY so idle workers wake at once.

    Off unless asked for: PostgreSQL serialises the commits of transactions that notify,
    which costs concurrent producers far more than the insert itself (see the README).
    """
    raw = _env(environ).get(ENV_NOTIFY, "0").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(f"{ENV_NOTIFY} must be 1 or 0, got {raw!r}")


def imports_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Modules named in ``ROUTEMQ_OUTBOX_IMPORT`` (comma or space separated)."""
    raw = _env(environ).get(ENV_IMPORT, "")
    return [name for name in re.split(r"[,\s]+", raw) if name]
