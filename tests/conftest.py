"""Shared fixtures: pulled weights, a real server subprocess over HTTP, keys made by the CLI."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.utils import REPO, Server, linked_weights, start_server, stop_server

# Same defaults as the CLI sets for the server process (must precede any rembg import).
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(sys.prefix) / "numba-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_weights() -> Path:
    """The repository's weights/, pulled (a no-op when already there and verified)."""
    from imgsvc.models.weights import pull

    weights = REPO / "weights"
    pull(weights, log=lambda line: None)
    return weights


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD inpainting pipeline built from configs (no download)."""
    from imgsvc.testing.tiny_diffusion import build_tiny_inpaint_pipeline

    dest = tmp_path_factory.mktemp("pipelines") / "tiny-sd-inpaint"
    build_tiny_inpaint_pipeline(dest)
    return dest


PG_ADMIN_URL = os.environ.get(
    "IMGSVC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def new_postgres_db() -> Iterator[Callable[[], str]]:
    """Makes fresh PostgreSQL databases on the local server; drops them after the run."""
    import secrets

    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"imgsvc_test_{secrets.token_hex(4)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same billing tests run on the embedded default and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.db'}"
    make: Callable[[], str] = request.getfixturevalue("new_postgres_db")
    return make()


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path, tiny_pipeline_dir: Path
) -> Iterator[Server]:
    """The real service over HTTP, with real weights and a tiny prompt-inpainting pipeline."""
    tmp = tmp_path_factory.mktemp("server")
    weights = linked_weights(tmp / "weights", repo_weights, tiny_pipeline_dir)
    srv = start_server(tmp, weights)
    yield srv
    stop_server(srv)
