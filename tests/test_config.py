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
