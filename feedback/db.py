"""Opening the store: engine, SQLite pragmas, migrations, and read/write transactions.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys, and write
transactions that start with `BEGIN IMMEDIATE`: a deferred transaction that later writes fails
at once with SQLITE_BUSY whatever the timeout, so writers take the lock up front and wait.
Switching a blank file to WAL is such an upgrade inside SQLite (a read, then the write lock), so
processes opening a new file together retry that switch themselves until the busy timeout.
Any other SQLAlchemy URL (PostgreSQL) is used as it is.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from feedback.config import database_url, make_folder
from feedback.errors import StoreUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 15.0
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _busy(text: str) -> bool:
    """Whether a database error's text says another program holds the lock."""
    return "locked" in text or "busy" in text


def _switch_to_wal(cursor, timeout_s: float) -> None:
    """`PRAGMA journal_mode=WAL`, retried while another connection holds the lock.

    On a file still in rollback mode SQLite takes a read lock and then upgrades it to switch
    the mode; the upgrade fails at once with "database is locked" when another process is
    doing the same (the busy handler is not called for an upgrade), as 16 processes opening
    a blank database together showed. A file already in WAL answers at once, lock-free."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _busy(str(exc)):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _configure_sqlite(engine: Engine, timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _switch_to_wal(cursor, timeout_s)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write")
                             else "BEGIN")


def make_engine(url: str) -> Engine:
    """A new engine for `url`; SQLite files get their folder created and the pragmas above.
    A URL SQLAlchemy cannot use (syntax, port, unknown driver) is `StoreUnavailable`."""
    try:
        return _make_engine(url)
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as exc:
        safe = url.split("@")[-1] if "@" in url else url
        raise StoreUnavailable(
            "The database URL cannot be used: the operator should fix CHAT_DATABASE_URL "
            "(e.g. sqlite:///path/feedback.db or postgresql+psycopg://user@host/db).",
            f"...@{safe}: {exc}" if "@" in url else f"{safe}: {exc}") from None
    except NotADirectoryError as exc:  # a SQLite file's folder: a file or a dangling link
        raise StoreUnavailable(
            "The database's folder cannot be made (something else is in its place) and nothing "
            "was saved: the operator should fix CHAT_DATA_DIR or CHAT_DATABASE_URL.",
            str(exc)) from None


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        timeout_s = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT_S))
        connect_args = {"check_same_thread": False}
        if "timeout" not in parsed.query:
            connect_args["timeout"] = timeout_s
        if parsed.database and parsed.database != ":memory:":
            make_folder(Path(parsed.database).expanduser().parent)
        engine = create_engine(url, connect_args=connect_args)
        _configure_sqlite(engine, timeout_s)
        return engine
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def migrate(engine: Engine) -> None:
    """Bring the database to the newest Alembic revision (a blank database gets every table).

    A database already at the newest revision is only read: no write lock is taken. Otherwise
    the migration runs in a write transaction from the start (BEGIN IMMEDIATE on SQLite), so
    processes opening a blank database together queue for the lock instead of failing on the
    first write, and each checks the revision again once it holds the lock: only the first
    migrates, the others hold the lock for one SELECT. (With the whole upgrade, scripts
    loaded, under the lock in every process, the 16th of 16 processes starting at once on 2
    cores once waited past the 15 s busy timeout.)"""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        head = ScriptDirectory.from_config(cfg).get_current_head()

        def at_head(conn) -> bool:
            return MigrationContext.configure(conn).get_current_revision() == head

        with engine.connect() as conn:
            if at_head(conn):
                return
        with engine.connect() as conn, conn.execution_options(write=True).begin():
            if not at_head(conn):
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except (OperationalError, DBAPIError, ValueError) as exc:
        raise _unavailable(exc, engine) from exc


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the configured URL), migrated on first use."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            migrate(engine)
            _engines[url] = engine
        return engine


def _unavailable(exc: Exception, engine: Engine) -> StoreUnavailable:
    where = engine.url.render_as_string(hide_password=True)
    text = str(getattr(exc, "orig", exc)) or type(exc).__name__
    detail = f"{where}: {text}"
    log.warning("database error: %s", detail)
    if _busy(text):
        return StoreUnavailable("The database is busy (locked by another program) and nothing "
                                "was saved. Try again in a moment.", detail)
    return StoreUnavailable("The database cannot be reached and nothing was saved. Try again "
                            "in a moment; if it lasts, the operator should check that it is "
                            "running and that CHAT_DATABASE_URL is right.", detail)


@contextmanager
def transaction(*, write: bool = False, url: str | None = None) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error.

    Database faults (locked, unreachable) surface as `StoreUnavailable` with a clear message;
    the caller keeps whatever the user typed, since nothing was written.
    """
    engine = get_engine(url)
    bind = engine.execution_options(write=True) if write else engine
    try:
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session
    except (OperationalError, DBAPIError) as exc:
        raise _unavailable(exc, engine) from exc
