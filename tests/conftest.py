"""Shared fixtures: pulled weights, a real server subprocess over HTTP, keys made by the CLI."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.utils import (
    REPO,
    SECRETS,
    SERVER_LOGS,
    Server,
    linked_weights,
    photo_bytes,
    start_server,
    stop_server,
)

# Same defaults as the CLI sets for the server process (must precede any rembg import).
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(sys.prefix) / "numba-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_server_logs() -> Iterator[None]:
    """After the whole run: no server log holds a key or an admin token the tests used."""
    yield
    leaks = []
    for log in SERVER_LOGS:
        text = log.read_text(errors="replace") if log.exists() else ""
        leaks += [f"{log}: {secret[:8]}…" for secret in SECRETS if secret in text]
    assert not leaks, f"secrets in server logs: {leaks}"


@pytest.fixture(scope="module")
def two_torch_threads() -> Iterator[None]:
    """torch on 2 threads for a module's tests (the machines' core count), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_weights() -> Path:
    """The repository's weights/, pulled (a no-op when already there and verified)."""
    from imgsvc.weights.pull import pull

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


class _ImageOrigin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/to/"))
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        body = {"/car.jpg": photo_bytes(), "/big": b"x" * 5000}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _CountingServer(ThreadingHTTPServer):
    """Counts every TCP connection it accepts."""

    connections = 0

    def get_request(self) -> tuple[socket.socket, object]:
        conn = super().get_request()
        type(self).connections += 1
        return conn


@pytest.fixture(scope="session")
def _origin_server() -> Iterator[_CountingServer]:
    httpd = _CountingServer(("127.0.0.1", 0), _ImageOrigin)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="session")
def origin(_origin_server: _CountingServer) -> str:
    """A local image server: /car.jpg, /big, /loop, /to/<url> (302 to <url>)."""
    return f"http://127.0.0.1:{_origin_server.server_address[1]}"


@pytest.fixture
def origin_connections(_origin_server: _CountingServer) -> Callable[[], int]:
    """How many connections the local image server has accepted so far."""
    return lambda: _CountingServer.connections
