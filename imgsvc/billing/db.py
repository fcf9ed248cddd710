"""Engine, sessions and migrations. SQLite (WAL, BEGIN IMMEDIATE, synchronous=FULL) is the
embedded default; PostgreSQL (psycopg 3) when the URL says `postgresql+psycopg://…`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


class Database:
    """Owns the SQLAlchemy engine; `transaction()` yields a session committed on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

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
        with self._sessions.begin() as session:
            if not durable:
                if self.dialect == "postgresql":
                    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                else:
                    session.connection(execution_options={"imgsvc_durable": False})
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (on SQLite it does not take the write lock)."""
        with self._sessions.begin() as session:
            session.connection(execution_options={"imgsvc_read": True})
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # As many connections as the worker threads that may use them (anyio default: 40).
        return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)
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
