"""Test helpers: a real server subprocess, keys made by the CLI, test photos."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
# Every key and admin token handed to a test server, and every server log: at the end of the
# run no log may hold any of them (tests/conftest.py).
SECRETS: set[str] = set()
SERVER_LOGS: list[Path] = []


def linked_weights(root: Path, repo_weights: Path, pipeline: Path | None) -> Path:
    """A weights dir with the pulled weights linked in and, optionally, a diffusers pipeline."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("rembg", "upscale"):
        (root / sub).symlink_to(repo_weights / sub, target_is_directory=True)
    if pipeline is not None:
        (root / "diffusers").mkdir()
        (root / "diffusers" / pipeline.name).symlink_to(pipeline, target_is_directory=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str) -> str:
        """Run `imgsvc …` against this server's database; return stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "imgsvc", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    def new_key(self, credits: int, name: str = "test") -> str:
        out = self.cli("keys", "create", "--name", name, "--credits", str(credits))
        key = out.splitlines()[-1]
        SECRETS.add(key)
        return key

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=300,
            event_hooks={"response": [_remember_new_keys]},
        )


def _remember_new_keys(response: httpx.Response) -> None:
    """A key the API created (`201 {"key": …}`) joins SECRETS."""
    if response.status_code == 201 and "json" in response.headers.get("content-type", ""):
        response.read()
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("key"), str):
            SECRETS.add(body["key"])


def start_server(tmp: Path, weights: Path, *args: str, **env: str) -> Server:
    """`imgsvc serve` (plus `args`) on a fresh SQLite database in `tmp`, ready to serve."""
    port = _free_port()
    full_env = {
        **os.environ,
        "IMGSVC_DATABASE_URL": f"sqlite:///{tmp / 'imgsvc.db'}",
        "IMGSVC_WEIGHTS_DIR": str(weights),
        "IMGSVC_DEVICE": "cpu",
        "IMGSVC_TORCH_THREADS": "1",
        **env,
    }
    log = tmp / "server.log"
    SERVER_LOGS.append(log)
    if full_env.get("IMGSVC_ADMIN_TOKEN"):
        SECRETS.add(full_env["IMGSVC_ADMIN_TOKEN"])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgsvc", "serve", "--port", str(port), *args],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", full_env, proc, log)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready in time:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


def photo_bytes(name: str = "car.jpg") -> bytes:
    return (DATA / name).read_bytes()


@contextlib.contextmanager
def one_torch_thread_no_network() -> Iterator[None]:
    """Tiny models run faster on one thread; any network use (DNS lookup, connect) is an error.

    Attempts are refused like an unreachable network would refuse them and are recorded, because
    the Hugging Face libraries catch connection errors; the check runs when the block ends.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real_connect = socket.socket.connect
    attempts: list[Any] = []

    def refuse_connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in tests: {address!r}")
        real_connect(self, address)

    def refuse_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise socket.gaierror(f"network disabled in tests: {host!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse_connect)
        patch.setattr(socket, "getaddrinfo", refuse_getaddrinfo)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
    assert attempts == [], f"network access attempted: {attempts!r}"
