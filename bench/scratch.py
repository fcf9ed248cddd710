"""Throw-away databases for the bench scripts: a fresh PostgreSQL database on the local server
(`IMGSVC_TEST_POSTGRES`, as the tests use), dropped afterwards, and the local Redis."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN = os.environ.get(
    "IMGSVC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS = os.environ.get("IMGSVC_BENCH_REDIS", "redis://127.0.0.1:6379/0")


@contextmanager
def database(kind: str, folder: Path, prefix: str) -> Iterator[str]:
    """A fresh, empty database URL of `kind`: SQLite, a file in `folder`; PostgreSQL, a
    database named `prefix` + random hex, dropped (connections and all) afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / (prefix + '.db')}"
        return
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
