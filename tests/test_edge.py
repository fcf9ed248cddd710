"""The HTTP edge over real sockets: refusals from the headers alone (401, 413, 431) before the
body is read, the server's own errors as JSON, numbers range-checked before the database,
balances with a maximum, RFC 3339 timestamps, statements, security headers and CORS."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.utils import Server, start_server, stop_server

ADMIN = "edge-admin-token"
BIG = 2**63


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    """A server that loads no model (the edge needs none), with the admin API and CORS on."""
    tmp = tmp_path_factory.mktemp("edge")
    srv = start_server(
        tmp,
        repo_weights,
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_ADMIN_TOKEN=ADMIN,
        IMGSVC_CORS_ORIGINS="https://shop.example",
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
    )
    yield srv
    stop_server(srv)


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


class RawResponse:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }

    def error(self) -> dict[str, str]:
        assert self.headers["content-type"] == "application/json"
        err: dict[str, str] = json.loads(self.body)["error"]
        assert err["code"] and err["message"] and err["request_id"]
        return err


def _exchange(server: Server, head: bytes, body: bytes = b"", timeout: float = 10) -> RawResponse:
    """Send `head`, then `body` from another thread while reading the answer until closed."""
    sock = socket.create_connection(_address(server), timeout=timeout)
    sock.sendall(head)

    def pump() -> None:
        with contextlib.suppress(OSError):  # the server closed the connection: body refused
            sock.sendall(body)

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
            if b"\r\n\r\n" in raw and _complete(raw):
                break
    except ConnectionResetError:
        pass
    sock.close()
    return RawResponse(raw)


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def test_no_key_is_refused_before_a_large_body_is_read(edge_server: Server) -> None:
    # 100 MB declared, nothing sent: the 401 comes from the headers alone.
    head = (
        b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n"
    )
    started = time.monotonic()
    r = _exchange(edge_server, head)
    assert r.status == 401 and r.error()["code"] == "unauthorized"
    assert r.headers["connection"] == "close"  # the unread body cannot be followed by a request
    assert time.monotonic() - started < 5


def test_declared_body_over_the_route_limit_is_413_before_it_is_read(edge_server: Server) -> None:
    key = edge_server.new_key(10)
    for path in ("/v1/upscale", "/v1/remove-background", "/v1/jobs", "/v1/keys"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {10**12}\r\n\r\n"
        ).encode()
        r = _exchange(edge_server, head)
        assert r.status == 413, path
        assert r.error()["code"] == "payload_too_large"


def test_chunked_body_is_cut_at_the_limit(edge_server: Server) -> None:
    key = edge_server.new_key(10)
    head = (
        f"POST /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"100000\r\n" + b"a" * 0x100000 + b"\r\n"  # 1 MiB per chunk, 8 of them
    r = _exchange(edge_server, head, chunk * 8)
    assert r.status == 413 and r.error()["code"] == "payload_too_large"


def test_large_headers_are_431_json(edge_server: Server) -> None:
    head = b"GET /v1/account HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    r = _exchange(edge_server, head)
    assert r.status == 431 and r.error()["code"] == "headers_too_large"
    # An endless header arriving in pieces is refused once past the limit, not buffered.
    r = _exchange(edge_server, b"GET / HTTP/1.1\r\nX-Endless: ", b"a" * 8_000_000)
    assert r.status == 431


def test_invalid_http_is_answered_in_the_json_error_shape(edge_server: Server) -> None:
    r = _exchange(edge_server, b"GET /v1/account HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
    assert r.status == 400 and r.error()["code"] == "bad_request"
    assert r.headers["x-request-id"] == r.error()["request_id"]


def test_integers_past_64_bits_are_422(edge_server: Server) -> None:
    key = edge_server.new_key(10)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with edge_server.client(key) as c:
        calls = [
            c.get("/v1/usage", params={"offset": BIG}),
            c.get("/v1/usage", params={"key_id": BIG}),
            c.delete(f"/v1/keys/{BIG}"),
            c.get(f"/v1/keys/{BIG}/usage"),
            c.post("/v1/keys", json={"name": "x", "monthly_cap": BIG}),
            c.post("/v1/admin/keys", headers=admin, json={"name": "x", "credits": BIG}),
            c.post(f"/v1/admin/keys/{BIG}/revoke", headers=admin),
            c.post(f"/v1/admin/keys/{BIG}/rotate", headers=admin, json={}),
            c.post(f"/v1/admin/keys/{BIG}/topup", headers=admin, json={"credits": 1}),
            c.post("/v1/admin/keys/1/topup", headers=admin, json={"credits": BIG}),
            c.post("/v1/admin/keys/1/rotate", headers=admin, json={"old_valid_for_seconds": BIG}),
        ]
    for r in calls:
        assert r.status_code == 422, (r.request.url, r.text)
        assert r.json()["error"]["code"] == "invalid_request"


def test_balance_has_a_maximum_and_no_credit_is_lost(edge_server: Server) -> None:
    from imgsvc.billing.limits import MAX_CREDITS

    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=edge_server.url, headers=admin) as c:
        created = c.post("/v1/admin/keys", json={"name": "rich", "credits": MAX_CREDITS - 5})
        assert created.status_code == 201
        key_id = created.json()["info"]["id"]
        over = c.post(f"/v1/admin/keys/{key_id}/topup", json={"credits": 6})
        assert over.status_code == 409 and "maximum" in over.json()["error"]["message"]
        fits = c.post(f"/v1/admin/keys/{key_id}/topup", json={"credits": 5})
        assert fits.status_code == 200 and fits.json()["credits"] == MAX_CREDITS
    verify = edge_server.cli("billing", "verify")
    assert "mismatch" not in verify.lower()


def test_statement_months_and_csv_pages(edge_server: Server) -> None:
    key = edge_server.new_key(100)
    with edge_server.client(key) as c:
        for month in ("9999-12", "0000-01", "2026-13", "2026-1", "x"):
            r = c.get(f"/v1/statements/{month}")
            assert r.status_code == 422, month
            assert "error" in r.json()
        for _ in range(3):  # three charged erases this month (OpenCV: no weights needed)
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), (200, 40, 40)).save(buf, "PNG")
            erased = c.post(
                "/v1/inpaint",
                data={"mask_boxes": "[[4, 4, 8, 8]]", "model": "opencv-telea"},
                files={"image": ("x.png", buf.getvalue(), "image/png")},
            )
            assert erased.status_code == 200, erased.text
        month = datetime.now(UTC).strftime("%Y-%m")

        def csv_rows(**page: int) -> list[str]:
            r = c.get(f"/v1/statements/{month}", params={"format": "csv", **page})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            return r.text.strip().splitlines()[1:]  # without the header line

        everything = csv_rows()
        assert len(everything) == 3
        assert csv_rows(limit=1) == everything[:1]
        assert csv_rows(limit=1, offset=2) == everything[2:]
        created_at = everything[0].rsplit(",", 1)[1]  # RFC 3339 in UTC in the CSV too
        assert created_at.endswith("Z") and datetime.fromisoformat(created_at).tzinfo is not None


def test_timestamps_are_rfc3339_with_a_zone(edge_server: Server) -> None:
    key = edge_server.new_key(10)
    with edge_server.client(key) as c:
        created_at = c.get("/v1/account").json()["created_at"]
    assert datetime.fromisoformat(created_at).tzinfo is not None, created_at


def test_quote_refuses_what_the_call_would(edge_server: Server) -> None:
    key = edge_server.new_key(10)
    with edge_server.client(key) as c:
        for operation in ("remove-background", "upscale", "inpaint"):
            r = c.post(
                "/v1/quote", json={"operation": operation, "width": 100_000, "height": 100_000}
            )
            assert r.status_code in (413, 422), (operation, r.text)
        r = c.post(
            "/v1/quote",
            json={"operation": "upscale", "width": 4000, "height": 4000, "scale": 4},
        )
        assert r.status_code == 422


def test_security_headers_and_cors(edge_server: Server) -> None:
    r = httpx.get(f"{edge_server.url}/healthz")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = httpx.options(
        f"{edge_server.url}/v1/upscale",
        headers={"Origin": "https://shop.example", **preflight},
    )
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
    other = httpx.options(
        f"{edge_server.url}/v1/upscale", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_closed_by_default(server: Server) -> None:
    r = httpx.get(f"{server.url}/healthz", headers={"Origin": "https://shop.example"})
    assert "access-control-allow-origin" not in r.headers


def test_an_unexpected_error_is_json_and_logged_once(tmp_path: Path) -> None:
    """A route that raises: 500 in the JSON shape, one log record with the traceback."""
    import logging

    import uvicorn

    from imgsvc.app import create_app
    from imgsvc.config import Settings
    from imgsvc.server import protocol_with_limit

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        preload_models=False,
        jobs_dir=tmp_path / "jobs",
    )
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                records.append(record)

    handler = Collect()
    logging.getLogger().addHandler(handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        app, port=port, http=protocol_with_limit(32768), log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            r = c.get("/boom")
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "internal_error"
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
            assert c.get("/healthz").status_code == 200  # the same connection still works
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        logging.getLogger().removeHandler(handler)
    assert len(records) == 1, [r.getMessage() for r in records]
