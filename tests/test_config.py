"""Database URLs: each family gets its drivers; a missing driver names what to install."""

from __future__ import annotations

import pytest

from routemq_outbox.config import async_url, dialect_family, sync_url
from routemq_outbox.database import _driver_missing


@pytest.mark.parametrize(
    ("url", "asynchronous", "synchronous"),
    [
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db", "sqlite+pysqlite:///x.db"),
        (
            "mysql://u:pw@h:3306/d",
            "mysql+asyncmy://u:***@h:3306/d?charset=utf8mb4",
            "mysql+pymysql://u:***@h:3306/d?charset=utf8mb4",
        ),
        (
            "mariadb+pymysql://u@h/d?charset=utf8mb3",
            "mariadb+asyncmy://u@h/d?charset=utf8mb3",
            "mariadb+pymysql://u@h/d?charset=utf8mb3",
        ),
        (
            "mysql+aiomysql://u@h/d",
            "mysql+aiomysql://u@h/d?charset=utf8mb4",
            "mysql+pymysql://u@h/d?charset=utf8mb4",
        ),
    ],
)
def test_urls_get_the_drivers_of_their_family(
    url: str, asynchronous: str, synchronous: str
) -> None:
    assert async_url(url).render_as_string() == asynchronous
    assert sync_url(url).render_as_string() == synchronous


def test_mysql_and_mariadb_are_one_family() -> None:
    assert dialect_family("mysql://u@h/d") == dialect_family("mariadb://u@h/d") == "mysql"


def test_a_missing_mysql_driver_names_the_extra() -> None:
    error = _driver_missing(async_url("mysql://u@h/d"), ImportError("No module named 'asyncmy'"))
    assert 'pip install "routemq-outbox[mysql]"' in str(error)


def test_routemqs_database_connection_is_the_default_database_unless_named() -> None:
    from routemq_outbox.config import database_url

    env = {"ROUTEMQ_OUTBOX_DATABASE_URL": "postgresql://u@h/app"}
    assert database_url("database", env) == "postgresql://u@h/app"
    assert database_url("database", {}) == "sqlite+aiosqlite:///routemq_outbox.db"
    named = {**env, "ROUTEMQ_OUTBOX_DATABASE_URL_DATABASE": "postgresql://u@h/jobs"}
    assert database_url("database", named) == "postgresql://u@h/jobs"


def test_routemqs_redis_connection_says_jobs_live_in_sql_and_how_to_map_it() -> None:
    from routemq_outbox.config import database_url
    from routemq_outbox.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as refused:
        database_url("redis", {"ROUTEMQ_OUTBOX_DATABASE_URL": "postgresql://u@h/app"})
    assert str(refused.value) == (
        "connection 'redis' is RouteMQ's Redis driver, which routemq-outbox cannot serve: jobs "
        "live in your SQL database. Leave connection= out to use the default database, or set "
        "ROUTEMQ_OUTBOX_DATABASE_URL_REDIS to the database URL that jobs pushed to 'redis' "
        "should go to"
    )
    mapped = {"ROUTEMQ_OUTBOX_DATABASE_URL_REDIS": "sqlite:///jobs.db"}
    assert database_url("redis", mapped) == "sqlite:///jobs.db"
    with pytest.raises(ConfigurationError, match="unknown connection 'reporting'"):
        database_url("reporting", {})
