"""Engine, sessions and migrations. SQLite (WAL, BEGIN IMMEDIATE, synchronous=FULL) is the
embedded default; PostgreSQL (psycopg 3) when the URL says `postgresql+psycopg://…`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

PING_AFTER_IDLE_S = 1.0
AUTOCOMMIT_POOL = 8  # connections of `statements()`


class Database:
    """Owns the SQLAlchemy engine; `transaction()` yields a session committed on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._autocommit: Engine | None = None  # made on first use of statements()
        # SQLite has one writer at a time, and a connection that finds the database locked
        # polls for it with growing sleeps: this process's writers queue here instead.
        self._writer = threading.RLock() if self.dialect == "sqlite" else None
        self._autocommit_guard = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option(
            "script_location", str(resources.files("imgsvc.billing") / "migrations")
        )
        with self.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Session]:
        """A session committed on success, rolled back on error.

        `durable=False` commits without waiting for the disk (SQLite synchronous=NORMAL,
        PostgreSQL synchronous_commit=off): still atomic and consistent, but a power loss may
        forget the last commits. Used only where forgetting is safe (a credit hold: forgetting
        it gives the credits back), never for a charge.
        """
        with self._writing(), self._sessions.begin() as session:
            if not durable:
                if self.dialect == "postgresql":
                    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                else:
                    session.connection(execution_options={"imgsvc_durable": False})
            yield session

    def _writing(self) -> AbstractContextManager[object]:
        return self._writer if self._writer is not None else nullcontext()

    @contextmanager
    def connection(self, *, durable: bool = True) -> Iterator[Connection]:
        """`transaction()` for Core statements: a connection in one transaction, committed on
        success, without an ORM session's work per statement (the charged-call path)."""
        with self._writing(), self.engine.connect() as conn:
            if not durable and self.dialect != "postgresql":
                conn.execution_options(imgsvc_durable=False)
            with conn.begin():
                if not durable and self.dialect == "postgresql":
                    conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield conn

    @contextmanager
    def statements(self) -> Iterator[Connection]:
        """PostgreSQL: a connection where every statement is its own transaction (autocommit),
        committed by the server as it finishes: one round trip per statement."""
        if self._autocommit is None:
            with self._autocommit_guard:
                if self._autocommit is None:
                    self._autocommit = _autocommit_engine(self.url)
        with self._autocommit.connect() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (on SQLite it does not take the write lock)."""
        with self._sessions.begin() as session:
            session.connection(execution_options={"imgsvc_read": True})
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self._autocommit is not None:
            self._autocommit.dispose()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # As many connections as the worker threads that may use them (anyio default: 40).
        engine = create_engine(url, pool_size=20, max_overflow=20)
        _ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get("imgsvc_read"):
            conn.exec_driver_sql("BEGIN")
            return
        # PRAGMA synchronous applies per connection and only outside a transaction.
        sync = "NORMAL" if options.get("imgsvc_durable") is False else "FULL"
        conn.exec_driver_sql(f"PRAGMA synchronous={sync}")
        # Take the write lock up front so concurrent credit updates never deadlock or overdraw.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _autocommit_engine(url: str) -> Engine:
    """A pool of its own for `statements()`: its connections stay in autocommit, instead of
    switching a shared connection's mode at every checkout and back at every return. Its
    statements are short single round trips, so a few connections serve many threads, and
    more than the database's cores would only queue there. No overflow: a pool closes an
    overflow connection when it is returned to a full pool, so under load it would open a
    new one (a new server process) every few calls."""
    engine = create_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=AUTOCOMMIT_POOL, max_overflow=0
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use if it sat idle for `PING_AFTER_IDLE_S` (a server
    restart or a dropped link is found then, and the pool reconnects), instead of a round trip
    before every use as `pool_pre_ping` would: a busy pool's connections were just in use."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool replaces this connection, and every other one as old.
            raise InvalidatePoolError(str(exc)) from exc
