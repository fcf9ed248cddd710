"""Fault-test helpers: private PostgreSQL and Redis servers that a test may stop and start, a
small tmpfs, a raw HTTP client that hangs up where it likes, the service in a thread, and
the files a process holds open.

The machine's shared PostgreSQL and Redis are never touched: every server here is started on
a free port, in a temporary folder, and stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from tests.utils import Server

PG_BIN_ROOT = Path("/usr/lib/postgresql")
REDIS_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
LIVENESS_S = 60.0  # the bound on anything a test waits for (a server up, a hold swept)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float = LIVENESS_S,
    detail: Callable[[], object] | None = None,
) -> None:
    """Poll `ready` until it is true; fail the test after `timeout` seconds (with `detail()`)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            more = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not so after {timeout:.0f} s{more}")
        time.sleep(0.1)


def _pg_bin(name: str) -> Path:
    found = sorted(PG_BIN_ROOT.glob(f"*/bin/{name}"))
    if not found:
        pytest.skip(f"PostgreSQL server binaries ({PG_BIN_ROOT}/*/bin/{name}) are not installed")
    return found[-1]


def _as_owner(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser` to start PostgreSQL as `postgres`")
    return ["runuser", "-u", "postgres", "--", *argv]


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of its own (trust auth, loopback, no Unix socket)."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        initdb = [str(_pg_bin("initdb")), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        subprocess.run(
            _as_owner([*initdb, "--no-sync", "-E", "UTF8"]),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c max_connections=200"
        )
        self._ctl("start", "-o", options, "-l", str(self.root / "postgres.log"))

    def stop(self, mode: str = "fast") -> None:
        """`fast`: connections are cut and running transactions rolled back, as in a restart."""
        self._ctl("stop", "-m", mode)

    def _ctl(self, *args: str) -> None:
        argv = [str(_pg_bin("pg_ctl")), "-D", str(self.data), "-w", "-t", "60", *args]
        done = subprocess.run(_as_owner(argv), capture_output=True, text=True, timeout=90)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl {args[0]} failed: {done.stdout}{done.stderr}")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not under pytest's tmp_path: its parents are private to root, and `postgres` must enter.
    root = Path(tempfile.mkdtemp(prefix="imgsvc-fault-pg-"))
    pg = PrivatePostgres(root)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PrivateRedis:
    """A redis-server of its own: no persistence, loopback only."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, *("--port", str(self.port), "--bind", "127.0.0.1"), *REDIS_NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for("redis answering", self._answers, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def pause(self) -> None:
        """Stop the process without closing its port: a Redis that never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def keys(self, pattern: str = "*") -> list[str]:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            names = cast("list[bytes]", client.keys(pattern))  # the client is synchronous
            return sorted(name.decode() for name in names)
        finally:
            client.close()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.resume()  # a stopped process does not die of SIGKILL until continued
        server.stop()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def open_files_under(pid: int, folder: Path) -> list[str]:
    """The files under `folder` process `pid` holds open (deleted ones too)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    found = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(f"{folder}/"):
                found.append(target)
    return found


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]
) -> tuple[str, bytes]:
    """A multipart/form-data body: (content type, body)."""
    boundary = f"fault-{secrets.token_hex(8)}"
    parts: list[bytes] = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    for name, (filename, data, media_type) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {media_type}\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


class RawHttp:
    """One HTTP/1.1 exchange on a plain socket, so the client can stop where a test wants."""

    def __init__(self, base_url: str, *, receive_buffer: int | None = None) -> None:
        host, port = httpx.URL(base_url).host, httpx.URL(base_url).port
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connect, so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(60)
        self.sock.connect((host, port or 80))
        self.host = host

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", *_header_lines(headers)]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_head(self) -> tuple[int, dict[str, str], bytes]:
        """The status line and headers; also the body bytes read past them."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before the headers: {buf[:200]!r}")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, rest

    def read_some(self, n: int) -> bytes:
        return self.sock.recv(n)

    def hang_up(self) -> None:
        """Close at once, with a reset rather than a polite end of stream."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.sock.close()


def _header_lines(headers: dict[str, str]) -> list[str]:
    return [f"{name}: {value}" for name, value in headers.items()]


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """The ASGI `app` served by uvicorn on a loopback port in a thread of this process (so a
    test can patch what the server runs); yields its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fault-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for("the in-process server started", lambda: server.started or not thread.is_alive())
        if not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def account_credits(server: Server, key: str) -> int:
    with server.client(key) as c:
        r = c.get("/v1/account")
        assert r.status_code == 200, r.text
        return int(r.json()["credits"])


@dataclass(frozen=True)
class Books:
    """What the database says about money: ledger kinds in order, usage rows, open holds."""

    ledger: list[str]
    usage: dict[str, int]  # request id → credits charged
    held: int  # holds still open


def read_books(database_url: str) -> Books:
    from sqlalchemy import create_engine, func, select

    from imgsvc.billing.schema import Hold, LedgerEntry, UsageEvent

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ledger = list(conn.scalars(select(LedgerEntry.kind).order_by(LedgerEntry.id)))
            usage = {
                rid: int(credits)
                for rid, credits in conn.execute(select(UsageEvent.request_id, UsageEvent.credits))
            }
            held = conn.scalar(select(func.count()).select_from(Hold).where(Hold.status == "held"))
        return Books(ledger, usage, int(held or 0))
    finally:
        engine.dispose()
