"""The bad-input corpus against the real server over HTTP, on every route that takes an image.

Each case x route is one test. Every refused case must answer a 4xx JSON error in the
documented shape (remove.bg's shape on `/v1.0/removebg`) and leave no trace: no credits taken,
no usage row, no job, no connection to a blocked address, and the keep-alive connection it came
on still serving the next request. Valid but awkward images (CMYK, 16-bit, LA, palette with
transparency, TIFF labelled image/jpeg, hostile file names) must work. The server's peak memory
stays bounded over the whole corpus.

Requests go through a small raw HTTP/1.1 client, so that bodies, lengths and headers can lie.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import corpus
from tests.corpus import Part, file_part, multipart
from tests.corpus import field as form_field
from tests.utils import Server, linked_weights, start_server, stop_server

ADMIN_TOKEN = "corpus-admin-token-0123456789"
UPLOAD_LIMIT = 2 * 1024 * 1024  # IMGSVC_MAX_UPLOAD_BYTES of the corpus server
JOB_LIMIT = 6 * 1024 * 1024  # IMGSVC_JOB_MAX_BYTES
PIXEL_LIMIT = 4_000_000  # IMGSVC_MAX_INPUT_PIXELS
FETCH_DEADLINE_S = 2.0  # IMGSVC_URL_FETCH_TIMEOUT_S
ALLOWED_HOST = "127.0.0.3"  # the one non-public address the server may fetch from
HANG_S = 30.0  # no answer in this long is a hang
QUICK_S = 5.0  # generous bound for requests refused from their first bytes
ORIGIN_TTL_S = 30.0  # the local origin's endless answers stop after this long
BAD_CHECKSUM_KEY = "isk_" + "A" * 32 + "_AAAAAA"


# --- the server, its keys, and a local origin it is allowed to fetch from ------------------


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    """A real server with small limits, fetching from 127.0.0.3 only (besides public hosts)."""
    tmp = tmp_path_factory.mktemp("corpus")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(
        tmp,
        weights,
        IMGSVC_ADMIN_TOKEN=ADMIN_TOKEN,
        IMGSVC_DEFAULT_RATE_LIMIT="1000000/minute",
        IMGSVC_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        IMGSVC_JOB_MAX_BYTES=str(JOB_LIMIT),
        IMGSVC_MAX_INPUT_PIXELS=str(PIXEL_LIMIT),
        IMGSVC_URL_FETCH_TIMEOUT_S=str(FETCH_DEADLINE_S),
        IMGSVC_URL_FETCH_ALLOW_CIDRS=f"{ALLOWED_HOST}/32",
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
        IMGSVC_JOB_SWEEP_SECONDS="0.5",
        IMGSVC_BODY_TIMEOUT_S="2",  # a body that stops short (lying Content-Length): 408 soon
    )
    yield srv
    stop_server(srv)


def admin_key(server: Server, name: str, credits: int) -> str:
    with server.client() as client:
        r = client.post(
            "/v1/admin/keys",
            json={"name": name, "credits": credits},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


@dataclass
class Keys:
    refused: str  # every refused case runs with this key: it must never be charged
    works: str  # the cases that must work spend from this one


@pytest.fixture(scope="module")
def keys(corpus_server: Server) -> Keys:
    return Keys(
        admin_key(corpus_server, "corpus-refused", 1000),
        admin_key(corpus_server, "corpus-works", 100_000),
    )


def vm_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/{pid}/status")


@pytest.fixture(scope="module")
def rss_at_start(corpus_server: Server, keys: Keys) -> int:
    return vm_kib(corpus_server.proc.pid, "VmRSS")


class _Origin(BaseHTTPRequestHandler):
    """An image host on 127.0.0.3: fine answers, and answers that never end."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = self.path
        if path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", path.removeprefix("/to/"))
            self.end_headers()
        elif path == "/car.jpg":
            self._answer(corpus.jpeg(), "image/jpeg")
        elif path == "/page.html":
            self._answer(corpus.html(), "text/html; charset=utf-8")
        elif path == "/gzip-bomb.png":
            self._answer(gzip.compress(bytes(64 * 1024 * 1024), 9), "image/png", gzip=True)
        elif path == "/declared-huge.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self._trickle(b"\xff", every_s=0.5)
        elif path == "/endless.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self._trickle(b"\xff" * 65536, every_s=0)
        elif path == "/trickle.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self._trickle(b"\xff", every_s=1)
        elif path == "/trickle-headers.jpg":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X", every_s=1, prefix=b"X-Slow: ")
        else:
            self.send_error(404)

    def _answer(self, body: bytes, content_type: str, *, gzip: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, piece: bytes, *, every_s: float, prefix: bytes = b"") -> None:
        """Send `piece` again and again until the client hangs up (or ORIGIN_TTL_S passes)."""
        end = time.monotonic() + ORIGIN_TTL_S
        try:
            self.wfile.write(prefix)
            self.wfile.flush()
            while time.monotonic() < end:
                self.wfile.write(piece)
                self.wfile.flush()
                if every_s:
                    time.sleep(every_s)
        except OSError:
            return

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def allowed_origin() -> Iterator[str]:
    httpd = ThreadingHTTPServer((ALLOWED_HOST, 0), _Origin)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{ALLOWED_HOST}:{httpd.server_address[1]}"
    httpd.shutdown()


@dataclass(frozen=True)
class Env:
    allowed: str  # origin the server may fetch from
    blocked: str  # the counting origin on 127.0.0.1, which the server must never reach
    blocked_port: int


@pytest.fixture(scope="module")
def env(allowed_origin: str, origin: str) -> Env:
    return Env(allowed_origin, origin, int(origin.rsplit(":", 1)[1]))


# --- a raw HTTP/1.1 client: bodies, lengths and headers exactly as given -------------------


@dataclass
class Call:
    path: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    method: str = "POST"
    length: int | None = -1  # Content-Length to declare: -1 the body's, None none
    chunked: bool = False
    answer_wait_s: float = HANG_S


@dataclass
class Reply:
    status: int  # 0: no answer
    headers: dict[str, str]
    body: bytes
    will_close: bool
    elapsed_s: float
    sent_all: bool
    problem: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=HANG_S)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: Call) -> Reply:
        lines = [f"{call.method} {call.path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in call.headers]
        if call.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif call.length is not None:
            lines.append(f"Content-Length: {len(call.body) if call.length < 0 else call.length}")
        started = time.monotonic()
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sent_all = self._send(head, call.body, call.chunked)
        self.sock.settimeout(call.answer_wait_s)
        try:
            response = http.client.HTTPResponse(self.sock, method=call.method)
            response.begin()
            body = response.read()
        except TimeoutError:
            return Reply(0, {}, b"", True, time.monotonic() - started, sent_all, "no answer")
        except (OSError, http.client.HTTPException) as exc:
            problem = f"no answer: {type(exc).__name__}: {exc}"
            return Reply(0, {}, b"", True, time.monotonic() - started, sent_all, problem)
        finally:
            self.sock.settimeout(HANG_S)
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Reply(
            response.status,
            headers,
            body,
            bool(response.will_close),
            time.monotonic() - started,
            sent_all,
        )

    def _send(self, head: bytes, body: bytes, chunked: bool) -> bool:
        """Send the request; stop early (False) once the server answers or hangs up."""
        piece = 64 * 1024
        try:
            self.sock.sendall(head)
            for at in range(0, len(body), piece):
                readable, _, _ = select.select([self.sock], [], [], 0)
                if readable:
                    return False
                data = body[at : at + piece]
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                self.sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


# --- the routes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    file_field: str
    fields: tuple[tuple[str, str], ...] = ()
    url_field: str | None = None  # `urls` for a job (JSON)
    removebg_shape: bool = False  # errors as {"errors": [{"title", "code", "request_id"}]}
    job: bool = False


ROUTES = {
    r.name: r
    for r in (
        Route("remove-background", "/v1/remove-background", "image", url_field="image_url"),
        Route("upscale", "/v1/upscale", "image", fields=(("scale", "2"),)),
        Route("inpaint", "/v1/inpaint", "image", fields=(("mask_boxes", "[[0, 0, 16, 16]]"),)),
        Route(
            "removebg",
            "/v1.0/removebg",
            "image_file",
            fields=(("size", "full"),),
            url_field="image_url",
            removebg_shape=True,
        ),
        Route(
            "jobs",
            "/v1/jobs",
            "files",
            fields=(("operation", "remove-background"),),
            url_field="urls",
            job=True,
        ),
    )
}
ALL = tuple(ROUTES)
URL_ROUTES = tuple(name for name, r in ROUTES.items() if r.url_field)
ONE = ("remove-background",)  # one sync route: the case is decided where every route shares code
ONE_AND_JOBS = ("remove-background", "jobs")  # …and the job route, which reads its body itself


def auth(key: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {key}")


def form_call(
    route: Route, parts: list[Part], *, extra_headers: list[tuple[str, str]] | None = None
) -> Call:
    body, content_type = multipart([form_field(n, v) for n, v in route.fields] + parts)
    return Call(route.path, body, [("Content-Type", content_type), *(extra_headers or [])])


def image_call(
    route: Route,
    data: bytes,
    *,
    filename: bytes = b"photo.jpg",
    content_type: bytes = b"image/jpeg",
    fields: tuple[tuple[str, str], ...] = (),
    extra_headers: list[tuple[str, str]] | None = None,
) -> Call:
    parts = [form_field(n, v) for n, v in fields]
    parts.append(file_part(route.file_field, data, filename=filename, content_type=content_type))
    return form_call(route, parts, extra_headers=extra_headers)


def url_call(route: Route, url: str) -> Call:
    assert route.url_field is not None
    if route.job:
        body = json.dumps({"operation": "remove-background", "urls": [url]}).encode()
        return Call(route.path, body, [("Content-Type", "application/json")])
    return form_call(route, [form_field(route.url_field, url)])


# --- the corpus ----------------------------------------------------------------------------

Build = Callable[[Route, Env], Call]
Check = Callable[[Route, Reply, Server, str], None]
STATUS = {
    "invalid_image": 422,
    "invalid_input": 422,
    "invalid_request": 422,
    "url_not_allowed": 422,
    "url_fetch_failed": 422,
    "unsupported_media_type": 415,
    "payload_too_large": 413,
    "archive_too_large": 413,
    "invalid_archive": 422,
    "unsafe_archive": 422,
    "unauthorized": 401,
}
ITEM_CODES = {
    "invalid_image",
    "unsupported_media_type",
    "payload_too_large",
    "url_not_allowed",
    "url_fetch_failed",
    "corrupt_member",
    "nested_archive",
}  # a job's item failures


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    codes: tuple[str, ...] = ()  # the error codes that may answer (empty: any, see statuses)
    statuses: tuple[int, ...] = ()  # with no codes: the 4xx statuses that may answer
    routes: tuple[str, ...] = ALL
    quick: bool = True  # refused from its first bytes: answered within QUICK_S
    may_close: bool = False  # the server may end the connection after answering
    works: Check | None = None  # a valid input: how to check its result
    early: bool = False  # must be answered before the whole body was sent
    blocked: bool = False  # a URL whose fetch must not connect to the counting origin


def file_case(name: str, make: Callable[[], bytes], codes: tuple[str, ...], **kw: Any) -> Case:
    return Case(name, lambda route, env: image_call(route, make()), codes, **kw)


def url_case(name: str, url: Callable[[Env], str], codes: tuple[str, ...], **kw: Any) -> Case:
    kw.setdefault("routes", URL_ROUTES)
    return Case(name, lambda route, env: url_call(route, url(env)), codes, **kw)


def works_case(name: str, make: Callable[[], bytes], **kw: Any) -> Case:
    filename = kw.pop("filename", b"photo.png")
    return Case(
        name,
        lambda route, env: image_call(route, make(), filename=filename),
        works=kw.pop("check", check_image_result),
        **kw,
    )


def check_image_result(route: Route, reply: Reply, server: Server, key: str) -> None:
    """200 with an image of the size the route promises (a job: succeeded, same output)."""
    if route.job:
        assert reply.status == 202, reply.body[:500]
        job = wait_job(server, key, reply.json()["id"])
        assert job["status"] == "succeeded", job
        item = job["items"][0]
        with server.client(key) as client:
            out = client.get(item["url"])
        assert out.status_code == 200, out.text[:300]
        body, size = out.content, (item["output_width"], item["output_height"])
    else:
        assert reply.status == 200, reply.body[:500]
        body, size = reply.body, (int(reply.headers["x-width"]), int(reply.headers["x-height"]))
    img = Image.open(io.BytesIO(body))
    img.load()
    assert img.size == size
    assert img.width >= 1 and img.height >= 1


def wait_job(server: Server, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    with server.client(key) as client:
        while time.monotonic() < deadline:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def check_safe_item_name(route: Route, reply: Reply, server: Server, key: str) -> None:
    check_image_result(route, reply, server, key)
    if route.job:
        name = reply.json()["items"][0]["name"]
        assert ".." not in name.split("/") and "\0" not in name and not name.startswith("/")
        assert len(name) <= 200
        jobs_dir = Path(server.env["IMGSVC_JOBS_DIR"]).resolve()
        for path in jobs_dir.rglob("*"):
            assert path.resolve().is_relative_to(jobs_dir)


def upload_of(size: int) -> bytes:
    """`size` bytes starting like a JPEG."""
    head = corpus.jpeg()
    return head + b"\0" * (size - len(head))


def many_empty_fields(route: Route, env: Env) -> Call:
    parts = [form_field("", "") for _ in range(10_000)]
    return form_call(route, [*parts, file_part(route.file_field, corpus.jpeg())])


def declared_over_cap(route: Route, env: Env) -> Call:
    """Headers announcing a body far past any route's limit; only part of it is ever sent."""
    call = image_call(route, upload_of(64 * 1024))
    call.length = 4 * (JOB_LIMIT if route.job else 10 * UPLOAD_LIMIT)
    call.body = call.body + bytes(8 * 1024 * 1024)  # past a socket buffer, short of the length
    call.answer_wait_s = 10
    return call


def chunked_over_cap(route: Route, env: Env) -> Call:
    cap = JOB_LIMIT if route.job else 3 * UPLOAD_LIMIT + 1024 * 1024
    call = image_call(route, upload_of(4 * cap))
    call.chunked = True
    return call


def content_length_short(route: Route, env: Env) -> Call:
    call = image_call(route, corpus.jpeg())
    call.length = len(call.body) - 100  # the last 100 bytes then look like a next request
    return call


def content_length_long(route: Route, env: Env) -> Call:
    call = image_call(route, corpus.jpeg())
    call.length = len(call.body) + 1000  # and the missing bytes never come
    call.answer_wait_s = 20
    return call


def with_header(name: str, value: str, make: Callable[[], bytes] = corpus.jpeg) -> Build:
    return lambda route, env: image_call(route, make(), extra_headers=[(name, value)])


def with_option(fields: dict[str, tuple[tuple[str, str], ...]]) -> Build:
    """A valid image with the route's own bad option values (a job: the upscale operation)."""

    def build(route: Route, env: Env) -> Call:
        if route.job:
            options = dict(fields["jobs"])
            parts = [form_field("operation", "upscale"), form_field("options", options["options"])]
            return form_call(
                Route(route.name, route.path, route.file_field, job=True),
                [*parts, file_part("files", corpus.jpeg())],
            )
        return image_call(route, corpus.jpeg(), fields=fields[route.name])

    return build


def zip_call(make: Callable[[], bytes]) -> Build:
    return lambda route, env: form_call(
        route,
        [file_part("file", make(), filename=b"photos.zip", content_type=b"application/zip")],
    )


TEXT_BOMB = 50 * 1024 * 1024
IMAGE_CODES = ("invalid_image",)
NOT_IMAGE = ("unsupported_media_type",)
TOO_LARGE = ("payload_too_large",)
BAD_URL = ("url_not_allowed",)
BAD_HOST = ("url_not_allowed", "url_fetch_failed")  # refused, or a name that does not resolve
BAD_OPTION = ("invalid_request", "invalid_input")

CASES: list[Case] = [
    # -- broken files
    file_case("empty-file", lambda: b"", IMAGE_CODES),
    file_case("jpeg-cut-in-header", corpus.jpeg_cut_in_header, IMAGE_CODES),
    file_case("jpeg-cut-mid-scan", corpus.jpeg_cut_mid_scan, IMAGE_CODES),
    file_case("webp-cut-in-header", corpus.webp_cut_in_header, IMAGE_CODES),
    file_case("png-bad-crc", corpus.png_bad_crc, IMAGE_CODES),
    file_case("avif-damaged-pixels", lambda: corpus.with_damaged_pixels("AVIF"), IMAGE_CODES),
    file_case("heif-damaged-pixels", lambda: corpus.with_damaged_pixels("HEIF"), IMAGE_CODES),
    # -- sizes that lie
    file_case(
        "png-100000x100000", lambda: corpus.png_claiming(100_000, 100_000, rows=300), TOO_LARGE
    ),
    file_case(
        "png-one-pixel-over-limit", lambda: corpus.png_zero_bytes_of(PIXEL_LIMIT + 1, 1), TOO_LARGE
    ),
    file_case("jpeg-header-65000x65000", lambda: corpus.jpeg_claiming(65_000, 65_000), TOO_LARGE),
    file_case(
        "tiff-header-100000x100000", lambda: corpus.tiff_claiming(100_000, 100_000), TOO_LARGE
    ),
    file_case("bmp-header-100000x100000", lambda: corpus.bmp_claiming(100_000, 100_000), TOO_LARGE),
    file_case(
        "gif-huge-frame-on-tiny-canvas",
        lambda: corpus.gif_frame_larger_than_canvas(16, 60_000),
        TOO_LARGE,
    ),
    file_case(
        "upload-one-byte-over-limit",
        lambda: upload_of(UPLOAD_LIMIT + 1),
        TOO_LARGE,
        quick=False,
        may_close=True,
    ),
    file_case(
        "icc-profile-50mb",
        lambda: corpus.png_with_icc(50 * 1024 * 1024, compressible=False),
        TOO_LARGE,
        routes=ONE_AND_JOBS,
        quick=False,
        may_close=True,
    ),
    # -- metadata that inflates
    file_case(
        "icc-profile-inflating-to-50mb",
        lambda: corpus.png_with_icc(TEXT_BOMB, compressible=True),
        IMAGE_CODES,
    ),
    file_case("png-ztxt-bomb", lambda: corpus.png_with_text_bomb(b"zTXt", TEXT_BOMB), IMAGE_CODES),
    file_case("png-itxt-bomb", lambda: corpus.png_with_text_bomb(b"iTXt", TEXT_BOMB), IMAGE_CODES),
    file_case(
        "png-ztxt-bomb-after-data",
        lambda: corpus.png_with_text_bomb(b"zTXt", TEXT_BOMB, after_idat=True),
        IMAGE_CODES,
        routes=ONE_AND_JOBS,
    ),
    # -- not images (whatever the part says)
    file_case("pdf-as-jpeg", corpus.pdf, NOT_IMAGE),
    file_case("psd-as-jpeg", corpus.psd, NOT_IMAGE),
    file_case("eps-as-jpeg", corpus.eps, NOT_IMAGE),
    file_case("svg-as-jpeg", corpus.svg, NOT_IMAGE),
    file_case("svg-with-script", lambda: corpus.svg(script=True), NOT_IMAGE),
    file_case("html-as-jpeg", corpus.html, NOT_IMAGE),
    # -- forms that lie or overflow
    Case("no-image-at-all", lambda route, env: form_call(route, []), BAD_OPTION),
    # Refused once the form parser passes its field limit, before the body was all read: the
    # connection is closed (the rest of the body must not be taken for another request).
    Case(
        "ten-thousand-empty-fields",
        many_empty_fields,
        statuses=(400, 413, 422),
        quick=False,
        may_close=True,
    ),
    Case(
        "content-length-shorter-than-body",
        content_length_short,
        statuses=(400, 422),
        routes=ONE_AND_JOBS,
        may_close=True,
    ),
    Case(
        "content-length-longer-than-body",
        content_length_long,
        statuses=(400, 408),
        routes=ONE,
        quick=False,
        may_close=True,
    ),
    Case("declared-body-over-cap", declared_over_cap, TOO_LARGE, may_close=True, early=True),
    Case(
        "declared-body-over-cap-bad-key",
        lambda route, env: with_key(declared_over_cap(route, env), BAD_CHECKSUM_KEY),
        ("payload_too_large", "unauthorized"),
        routes=ONE_AND_JOBS,
        may_close=True,
        early=True,
    ),
    Case(
        "chunked-body-over-cap",
        chunked_over_cap,
        TOO_LARGE,
        quick=False,
        may_close=True,
        early=True,
    ),
    # -- headers
    Case(
        "header-100kb",
        with_header("X-Padding", "a" * 100_000),
        statuses=(400, 413, 431),
        may_close=True,
    ),
    Case("idempotency-key-empty", with_header("Idempotency-Key", ""), ("invalid_input",)),
    Case(
        "idempotency-key-300-chars", with_header("Idempotency-Key", "k" * 300), ("invalid_input",)
    ),
    Case(
        "api-key-bad-checksum",
        lambda route, env: with_key(image_call(route, corpus.jpeg()), BAD_CHECKSUM_KEY),
        ("unauthorized",),
        may_close=True,  # refused from the headers: the unread upload ends the connection
    ),
    # -- option values
    Case(
        "number-1e12",
        with_option(
            {
                "remove-background": (("quality", "1e12"),),
                "upscale": (("scale", "1e12"),),
                "inpaint": (("steps", "1e12"),),
                "removebg": (("crop_margin", "1e12"),),
                "jobs": (("options", '{"scale": 1e12}'),),
            }
        ),
        BAD_OPTION,
    ),
    Case(
        "number-nan",
        with_option(
            {
                "remove-background": (("quality", "NaN"),),
                "upscale": (("scale", "NaN"),),
                "inpaint": (("guidance_scale", "NaN"),),
                "removebg": (("crop_margin", "NaN"),),
                "jobs": (("options", '{"scale": NaN}'),),
            }
        ),
        BAD_OPTION,
    ),
    Case(
        "number-negative",
        with_option(
            {
                "remove-background": (("alpha_matting_erode_size", "-1"),),
                "upscale": (("scale", "-2"),),
                "inpaint": (("seed", "-1"),),
                "removebg": (("crop_margin", "-10"),),
                "jobs": (("options", '{"scale": -2}'),),
            }
        ),
        BAD_OPTION,
    ),
    Case(
        "number-2-pow-63",
        with_option(
            {
                "remove-background": (("quality", str(2**63)),),
                "upscale": (("target_width", str(2**63)),),
                "inpaint": (("seed", str(2**63)),),
                "removebg": (("crop_margin", str(2**63)),),
                "jobs": (("options", json.dumps({"target_width": 2**63})),),
            }
        ),
        BAD_OPTION,
    ),
    Case(
        "wrong-type",
        with_option(
            {
                "remove-background": (("crop", "maybe"),),
                "upscale": (("scale", "big"),),
                "inpaint": (("steps", "many"),),
                "removebg": (("crop", "maybe"),),
                "jobs": (("options", '{"scale": "big"}'),),
            }
        ),
        BAD_OPTION,
    ),
    # -- URLs the server must not fetch (the counting origin on 127.0.0.1 stays untouched)
    url_case(
        "url-metadata-service", lambda env: "http://169.254.169.254/latest/meta-data/", BAD_URL
    ),
    url_case("url-loopback", lambda env: f"{env.blocked}/car.jpg", BAD_URL, blocked=True),
    url_case(
        "url-v4-mapped-v6",
        lambda env: f"http://[::ffff:127.0.0.1]:{env.blocked_port}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case(
        "url-decimal-ip",
        lambda env: f"http://2130706433:{env.blocked_port}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case(
        "url-hex-ip",
        lambda env: f"http://0x7f000001:{env.blocked_port}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case(
        "url-short-ip",
        lambda env: f"http://127.1:{env.blocked_port}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case(
        "url-localhost-dot",
        lambda env: f"http://localhost.:{env.blocked_port}/car.jpg",
        BAD_HOST,
        blocked=True,
    ),
    url_case(
        "url-name-to-loopback",
        lambda env: f"http://LocalHost:{env.blocked_port}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case("url-ipv6-loopback", lambda env: f"http://[::1]:{env.blocked_port}/car.jpg", BAD_URL),
    url_case("url-file-scheme", lambda env: "file:///etc/passwd", BAD_URL),
    url_case(
        "url-gopher-scheme",
        lambda env: f"gopher://127.0.0.1:{env.blocked_port}/_GET",
        BAD_URL,
        blocked=True,
    ),
    url_case("url-data-scheme", lambda env: "data:image/png;base64,iVBORw0KGgo=", BAD_URL),
    url_case(
        "url-redirect-to-loopback",
        lambda env: f"{env.allowed}/to/{env.blocked}/car.jpg",
        BAD_URL,
        blocked=True,
    ),
    url_case("url-redirect-to-file", lambda env: f"{env.allowed}/to/file:///etc/passwd", BAD_URL),
    # -- URLs whose answers are bad (from the allowed origin)
    url_case("url-endless-body", lambda env: f"{env.allowed}/endless.jpg", TOO_LARGE, quick=False),
    url_case("url-declared-huge", lambda env: f"{env.allowed}/declared-huge.jpg", TOO_LARGE),
    url_case(
        "url-trickling-body",
        lambda env: f"{env.allowed}/trickle.jpg",
        ("url_fetch_failed",),
        quick=False,
    ),
    url_case(
        "url-trickling-headers",
        lambda env: f"{env.allowed}/trickle-headers.jpg",
        ("url_fetch_failed",),
        quick=False,
    ),
    url_case("url-text-html", lambda env: f"{env.allowed}/page.html", NOT_IMAGE),
    url_case(
        "url-gzip-bomb",
        lambda env: f"{env.allowed}/gzip-bomb.png",
        ("url_fetch_failed",),  # a compressed answer is refused, never inflated
        quick=False,
    ),
    # -- a job's zip holding bad images: each fails as an item, so the job is refused
    Case(
        "zip-of-bad-images",
        zip_call(
            lambda: corpus.zip_of(
                {
                    "cut.jpg": corpus.jpeg_cut_mid_scan(),
                    "bomb.png": corpus.png_with_text_bomb(b"zTXt", TEXT_BOMB),
                    "huge.png": corpus.png_claiming(100_000, 100_000),
                }
            )
        ),
        ("invalid_image", "payload_too_large"),
        routes=("jobs",),
    ),
    Case(
        "zip-member-name-nul",
        zip_call(corpus.zip_with_nul_in_name),
        ("unsafe_archive",),
        routes=("jobs",),
    ),
    Case(
        "zip-member-name-dot-dot",
        zip_call(lambda: corpus.zip_of({"ok.jpg": corpus.jpeg(), "../../evil.jpg": corpus.jpeg()})),
        ("unsafe_archive",),
        routes=("jobs",),
    ),
    Case(  # item names are stored (at most 300 characters): refused before anything is stored
        "zip-member-name-10kb",
        zip_call(lambda: corpus.zip_of({"n" * 10_240 + ".jpg": corpus.jpeg()})),
        ("invalid_archive",),
        routes=("jobs",),
    ),
    # -- valid but awkward: must work
    works_case("cmyk-jpeg", corpus.cmyk_jpeg, filename=b"cmyk.jpg"),
    works_case("gray-16-bit-png", corpus.gray16_png),
    works_case("rgb-16-bit-png", corpus.rgb48_png),
    works_case("la-png", corpus.la_png),
    works_case("palette-with-transparency-png", corpus.palette_transparent_png),
    works_case("tiff-as-jpeg", corpus.tiff, filename=b"photo.jpg"),
    works_case("exif-looping-ifd", corpus.jpeg_exif_looping_ifd, routes=ONE_AND_JOBS),
    works_case("exif-orientation-9", lambda: corpus.jpeg_orientation(9), routes=ONE_AND_JOBS),
    works_case("gif-10000-frames", lambda: corpus.animated_gif(10_000), routes=ONE_AND_JOBS),
    works_case("webp-10000-frames", lambda: corpus.animated_webp(10_000), routes=ONE_AND_JOBS),
    works_case(
        "gif-frame-larger-than-canvas",
        lambda: corpus.gif_frame_larger_than_canvas(16, 40),
        routes=ONE_AND_JOBS,
    ),
    works_case(
        "image-1x65535",
        lambda: corpus.one_by(65_535),
        routes=("remove-background", "inpaint", "jobs"),
    ),
    works_case(
        "filename-dot-dot",
        corpus.jpeg,
        filename=b"../../../../tmp/evil.jpg",
        check=check_safe_item_name,
    ),
    works_case("filename-nul", corpus.jpeg, filename=b"a\0b.jpg", check=check_safe_item_name),
    Case(  # past the multipart parser's limit on a part's headers
        "filename-10kb",
        lambda route, env: image_call(route, corpus.jpeg(), filename=b"n" * 10_240 + b".jpg"),
        statuses=(400, 413, 422),
    ),
]


def with_key(call: Call, key: str) -> Call:
    call.headers.append(auth(key))
    return call


def _params() -> list[Any]:
    out = []
    for case in CASES:
        for route in case.routes:
            out.append(pytest.param(case, ROUTES[route], id=f"{case.name}-{route}"))
    return out


# --- the checks ----------------------------------------------------------------------------


def error_of(route: Route, reply: Reply) -> tuple[str, dict[str, Any]]:
    """(code, error object) of an error reply, asserting the documented body shape."""
    assert reply.headers.get("content-type", "").startswith("application/json"), (
        reply.status,
        reply.headers,
        reply.body[:300],
    )
    body = reply.json()
    if route.removebg_shape:
        assert isinstance(body.get("errors"), list), (reply.status, body)
        (err,) = body["errors"]
        assert {"title", "code", "request_id"} <= set(err), body
        assert isinstance(err["title"], str) and err["title"]
    else:
        assert isinstance(body.get("error"), dict), (reply.status, body)
        err = body["error"]
        assert {"code", "message", "request_id"} <= set(err), body
        assert isinstance(err["message"], str) and err["message"]
    assert err["request_id"] and err["request_id"] == reply.headers.get("x-request-id"), body
    assert "Traceback" not in reply.body.decode("utf-8", "replace")
    return str(err["code"]), err


def check_refusal(case: Case, route: Route, reply: Reply) -> None:
    assert reply.status != 0, f"{reply.problem} after {reply.elapsed_s:.1f} s"
    assert 400 <= reply.status < 500, (reply.status, reply.body[:500])
    code, err = error_of(route, reply)
    if route.job and code == "invalid_input" and "failed" in err:
        item_codes = {f["error"]["code"] for f in err["failed"]}
        assert reply.status == 422
        assert item_codes <= set(case.codes) | (ITEM_CODES if not case.codes else set()), err
        return
    if case.codes:
        assert code in case.codes, (reply.status, err)
        assert reply.status == STATUS.get(code, reply.status), (reply.status, err)
    else:
        assert reply.status in case.statuses, (reply.status, err)


def account(conn: RawConnection, key: str) -> Reply:
    return conn.send(Call("/v1/account", method="GET", headers=[auth(key)], length=None))


def balance(server: Server, key: str) -> int:
    with server.client(key) as client:
        return int(client.get("/v1/account").json()["credits"])


@pytest.mark.parametrize(("case", "route"), _params())
def test_corpus(
    case: Case,
    route: Route,
    corpus_server: Server,
    keys: Keys,
    env: Env,
    rss_at_start: int,
    origin_connections: Callable[[], int],
) -> None:
    """One case on one route. Every route decodes through `images.decode` and reads its body
    through the same edge, so the expensive cases (a 50 MB upload, 10,000-frame animations,
    a body that never ends) run on /v1/remove-background only, plus /v1/jobs, which reads its
    form and its zips itself; cheap cases run on all five routes."""
    key = keys.works if case.works else keys.refused
    call = case.build(route, env)
    if not any(name.lower() == "authorization" for name, _ in call.headers):
        call.headers.append(auth(key))
    before = balance(corpus_server, key)
    reached = origin_connections()
    with RawConnection(corpus_server.url) as conn:
        reply = conn.send(call)
        if case.works:
            case.works(route, reply, corpus_server, key)
        else:
            check_refusal(case, route, reply)
        if case.quick:
            assert reply.elapsed_s < QUICK_S, f"answered after {reply.elapsed_s:.1f} s"
        if case.early:
            assert not reply.sent_all, "answered only after the whole body was sent"
        if case.blocked:
            assert origin_connections() == reached, "the server connected to a blocked address"
        # The same connection serves the next request, unless the server had to give it up.
        if reply.will_close:
            assert case.may_close, f"the server closed the connection after a {reply.status}"
        else:
            follow = account(conn, key)
            assert follow.status == 200, (follow.status, follow.problem, follow.body[:300])
    if not case.works:
        assert balance(corpus_server, key) == before, "a refused call was charged"
        with corpus_server.client(key) as client:
            assert client.get("/v1/usage").json()["data"] == []
            assert client.get("/v1/jobs").json()["jobs"] == []


BIG = 2**63  # one past the largest 64-bit integer a database column holds
RANGE_CALLS = [
    ("GET", f"/v1/usage?key_id={BIG}", None, False),
    ("GET", f"/v1/usage?offset={BIG}", None, False),
    ("GET", f"/v1/usage/summary?key_id={BIG}", None, False),
    ("GET", f"/v1/jobs?offset={BIG}", None, False),
    ("GET", f"/v1/keys/{BIG}/usage", None, False),
    ("DELETE", f"/v1/keys/{BIG}", None, False),
    ("POST", f"/v1/admin/keys/{BIG}/topup", {"credits": 1}, True),
    ("POST", "/v1/admin/keys", {"name": "big", "credits": BIG}, True),
    ("POST", "/v1/admin/keys/1/topup", {"credits": BIG}, True),
    ("GET", f"/v1/admin/usage?key_id={BIG}", None, True),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "as_admin"),
    RANGE_CALLS,
    ids=[f"{m} {p.split('?')[0]} {i}" for i, (m, p, _, _) in enumerate(RANGE_CALLS)],
)
def test_integers_past_64_bits_are_refused(
    corpus_server: Server,
    keys: Keys,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    as_admin: bool,
) -> None:
    """An integer no database column can hold is a 422, not a database error."""
    with corpus_server.client(ADMIN_TOKEN if as_admin else keys.refused) as client:
        r = client.request(method, path, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()["error"]) >= {"code", "message", "request_id"}


def test_server_memory_stays_bounded(corpus_server: Server, rss_at_start: int) -> None:
    """Runs after the corpus: its peak resident memory grew by less than a decoded bomb needs
    (a 100000x100000 image is 30 GB; the models and a few small images fit well under 1.5 GB)."""
    peak = vm_kib(corpus_server.proc.pid, "VmHWM")
    assert peak - rss_at_start < 1_500_000, f"peak {peak} KiB, {rss_at_start} KiB at the start"
    assert corpus_server.proc.poll() is None, "the server died"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
