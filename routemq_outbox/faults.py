"""What a database error means for the worker: wait and try again, or stop trying.

*Transient* errors are about reaching the database: a lost or refused connection, a timeout, a
server shutting down, a lock conflict or deadlock. They pass: the worker logs them, pauses and
tries again, for as long as it runs. Anything else is *permanent* for the statement that raised
it: a value the database cannot store, a constraint, a missing table. Repeating that statement
would fail the same way for ever, so the worker does something else (records a simpler
outcome, or stops when it was asked to run until the queue is empty).
"""

from __future__ import annotations

import sqlite3

import asyncpg
import sqlalchemy.exc

__all__ = ["TRANSIENT", "Backoff", "is_deadlock", "is_transient", "missing_schema"]

TRANSIENT = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    # Raised straight from asyncpg when a connection breaks mid-operation (seen when the
    # server shuts down); through SQLAlchemy it arrives as a DBAPIError.
    asyncpg.InternalClientError,
)
"""What the database (or reaching it) may raise: logged without a traceback."""

# SQLSTATE classes (and codes) of PostgreSQL errors that pass: connection exceptions,
# transaction rollbacks (serialization failures, deadlocks), insufficient resources (too many
# connections), operator intervention (shutdown, "cannot connect now"), system errors, and
# a lock that is not available.
_PG_TRANSIENT = ("08", "40", "53", "57", "58", "55P03")
# Schema or database missing: undefined table / column / function, database does not exist.
_PG_MISSING = {"42P01": "a table", "42703": "a column", "3D000": "the database"}
# MySQL/MariaDB: no such table, unknown column, unknown database.
_MYSQL_MISSING = {1146: "a table", 1054: "a column", 1049: "the database"}
_MYSQL_PERMANENT = range(1000, 2000)  # server errors about the statement (not 2xxx: client)
_MYSQL_TRANSIENT = {1205, 1213, 1040, 1053, 1317}  # lock wait, deadlock, too many, shutdown
_SQLITE_MISSING = {
    "no such table": "a table",
    "no such column": "a column",
    "unable to open database file": "the database file",
}


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the driver error a SQLAlchemy error wraps, and the errors those came from."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is known for known in seen):
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return seen


def _sqlstate(exc: BaseException) -> str | None:
    for cause in _causes(exc):
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
    return None


def _mysql_code(exc: BaseException) -> int | None:
    for cause in _causes(exc):
        if type(cause).__module__.split(".")[0] in ("pymysql", "asyncmy", "MySQLdb"):
            args = getattr(cause, "args", ())
            if args and isinstance(args[0], int):
                return args[0]
    return None


def is_deadlock(exc: BaseException) -> bool:
    """Whether the database chose ``exc``'s transaction as a deadlock's victim and rolled it
    back: running the same transaction again is the remedy."""
    return _mysql_code(exc) == 1213 or _sqlstate(exc) == "40P01"


def missing_schema(exc: BaseException) -> str | None:
    """What is missing when ``exc`` says a table, a column or the database itself is not
    there ("a table", "the database", ...), else None."""
    state = _sqlstate(exc)
    if state in _PG_MISSING:
        return _PG_MISSING[state]
    code = _mysql_code(exc)
    if code in _MYSQL_MISSING:
        return _MYSQL_MISSING[code]
    for cause in _causes(exc):
        if isinstance(cause, sqlite3.Error):
            message = str(cause).lower()
            for text, what in _SQLITE_MISSING.items():
                if text in message:
                    return what
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same statement again later may work."""
    if missing_schema(exc) is not None:
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = _sqlstate(exc)
    if state is not None:
        return state.startswith(_PG_TRANSIENT)
    code = _mysql_code(exc)
    if code is not None:
        return code in _MYSQL_TRANSIENT or code not in _MYSQL_PERMANENT
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # Without a code: SQLite ("database is locked", I/O errors) and errors about the
        # connection itself are operational; a value or a constraint is not.
        return (
            isinstance(
                exc,
                sqlalchemy.exc.OperationalError
                | sqlalchemy.exc.InterfaceError
                | sqlalchemy.exc.InternalError,
            )
            or type(exc) is sqlalchemy.exc.DBAPIError
        )
    return isinstance(
        exc,
        sqlalchemy.exc.TimeoutError
        | OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError,
    )


class Backoff:
    """Growing pauses between attempts to reach a database that is away: 0.5 s, doubled each
    time, up to 30 s."""

    MAX = 30.0

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(self.MAX, max(0.5, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0
