"""Every example of docs/client.md, run as its own process against the real server, exactly as
the docs give its command line; and a retry after a 503 that came after the work was done,
charged once."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageChops

import imgsvc.client
from imgsvc.client import AsyncClient, Client, ImageResult
from tests.utils import DATA, REPO, Server

DOC = REPO / "docs" / "client.md"
EXAMPLES = REPO / "examples"


def doc_commands() -> dict[str, list[str]]:
    """Each example's arguments, from the `python examples/…` lines of the docs' sh blocks."""
    commands: dict[str, list[str]] = {}
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S):
        for line in block.splitlines():
            if line.startswith("python examples/"):
                words = shlex.split(line)
                commands[Path(words[1]).name] = words[2:]
    return commands


def run_example(name: str, url: str, key: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    args = [arg.replace("tests/data/", f"{DATA}/") for arg in doc_commands()[name]]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env={**os.environ, "IMGSVC_API_URL": url, "IMGSVC_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert key not in done.stdout + done.stderr
    return done


def account_of(server: Server, key: str) -> tuple[int, int]:
    """(credits, number of usage rows) of a key."""
    with Client(server.url, key) as imgsvc:
        return imgsvc.account().credits, len(imgsvc.usage().data)


def test_the_docs_show_every_example_and_their_code_runs_against_this_client() -> None:
    text = DOC.read_text()
    examples = {p.name for p in EXAMPLES.glob("*.py")}
    assert examples >= {"remove_background.py", "upscale_async.py", "batch_job.py", "usage.py"}
    assert set(doc_commands()) == examples, "each example has its command line in the docs"
    assert set(re.findall(r"\(\.\./examples/(\w+\.py)\)", text)) == examples
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        compile(block, str(DOC), "exec")
        for names in re.findall(r"^from imgsvc\.client import (.+)$", block, re.M):
            for name in names.split(","):
                assert hasattr(imgsvc.client, name.strip()), name
    owners: dict[str, type] = {"close": Client, "aclose": AsyncClient, "save": ImageResult}
    for name in set(re.findall(r"`(\w+)\(", text)) - {"Client", "progress"}:
        if name in owners:
            assert hasattr(owners[name], name), name
        else:
            assert hasattr(Client, name) and hasattr(AsyncClient, name), name


def test_remove_background_example(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)
    done = run_example("remove_background.py", server.url, key, tmp_path)
    img = Image.open(tmp_path / "car-cutout.png")
    assert (img.mode, img.size) == ("RGBA", (480, 360))
    assert "credits charged: 10, remaining: 90" in done.stdout
    assert account_of(server, key) == (90, 1)


def test_erase_example(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)
    done = run_example("erase.py", server.url, key, tmp_path)
    assert "engine opencv-telea" in done.stdout and "credits charged: 10" in done.stdout
    photo = Image.open(DATA / "car.jpg").convert("RGB")
    erased = Image.open(tmp_path / "car-erased.png").convert("RGB")
    mask = Image.open(DATA / "car-mask.png").convert("L")
    diff = ImageChops.difference(photo, erased).convert("L")
    outside = ImageChops.multiply(diff, ImageChops.invert(mask))
    assert outside.getbbox() is None, "pixels outside the mask are returned as they were"
    assert ImageChops.multiply(diff, mask).getbbox() is not None, "the masked area changed"
    assert account_of(server, key) == (90, 1)


def test_upscale_async_example(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)
    done = run_example("upscale_async.py", server.url, key, tmp_path)
    assert Image.open(tmp_path / "upscaled" / "photo_crop.png").size == (256, 192)
    assert Image.open(tmp_path / "upscaled" / "cloth.png").size == (626, 960)
    # ceil(10 credits x output megapixels), at least 2: 0.05 MP -> 2, 0.60 MP -> 7
    assert "credits charged: 9" in done.stdout
    assert account_of(server, key) == (91, 2)


def test_batch_job_example(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)
    done = run_example("batch_job.py", server.url, key, tmp_path)
    assert "quote: 2 images, 20 credits" in done.stdout
    assert "succeeded, 2/2 images" in done.stdout and "credits charged: 20" in done.stdout
    assert re.search(r"succeeded: 2/2 done, 0 failed, 20 credits charged", done.stdout)
    with zipfile.ZipFile(tmp_path / "cutouts.zip") as archive:
        names = set(archive.namelist())
        assert {"car.png", "cloth.png", "manifest.csv", "manifest.json"} <= names
        cutout = Image.open(io.BytesIO(archive.read("cloth.png")))
        assert (cutout.mode, cutout.size) == ("RGBA", (313, 480))
    assert account_of(server, key) == (80, 2)


def test_usage_example(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)
    with Client(server.url, key) as imgsvc:
        imgsvc.erase(DATA / "car.jpg", DATA / "car-mask.png")
        upscale_price = imgsvc.quote_job("upscale", [DATA / "car.jpg"], options={"scale": 2})
        prefix = imgsvc.account().key_prefix
    done = run_example("usage.py", server.url, key, tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0] == f"key {prefix} (test): 90 credits"
    assert lines[1] == (
        f"{DATA / 'car.jpg'}: remove-background 10 credits, "
        f"upscale x2 {upscale_price.credits} credits"
    )
    assert "  inpaint: 1 calls, 10 credits" in lines
    assert "total: 1 calls, 10 credits" in lines
    csv_rows = (tmp_path / "usage.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 2 and csv_rows[0].startswith("request_id,")
    assert account_of(server, key) == (90, 1), "quotes are free"


# -- a 503 after the work was done --------------------------------------------------------------


@dataclass
class Forwarded:
    method: str
    path: str
    idempotency_key: str | None
    upstream_status: int
    replayed: bool


@dataclass
class FlakyProxy:
    """In front of the service: forwards everything, but answers the first POST with 503 and
    Retry-After: 1 once the service has answered it (the work done and charged)."""

    upstream: str
    url: str = ""
    seen: list[Forwarded] = field(default_factory=list)
    failed_once: bool = False


_HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "content-length",
                "content-encoding", "accept-encoding"}  # fmt: skip


def _handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            answer = httpx.request(
                self.command, proxy.upstream + self.path, headers=headers, content=body,
                timeout=300,
            )  # fmt: skip
            proxy.seen.append(
                Forwarded(
                    self.command,
                    self.path,
                    self.headers.get("Idempotency-Key"),
                    answer.status_code,
                    answer.headers.get("idempotent-replayed") == "true",
                )
            )
            if self.command == "POST" and not proxy.failed_once:
                proxy.failed_once = True
                error = {"code": "overloaded", "message": "try again", "request_id": "req_proxy"}
                self.reply(503, {"Content-Type": "application/json", "Retry-After": "1"},
                           json.dumps({"error": error}).encode())  # fmt: skip
                return
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            self.reply(answer.status_code, kept, answer.content)

        def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = forward

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


@pytest.fixture
def flaky_proxy(server: Server) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(server.url)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    proxy.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield proxy
    httpd.shutdown()
    httpd.server_close()


def test_a_retry_after_a_503_that_followed_the_work_charges_once(
    server: Server, flaky_proxy: FlakyProxy, tmp_path: Path
) -> None:
    key = server.new_key(100)
    done = run_example("remove_background.py", flaky_proxy.url, key, tmp_path)
    first, second = flaky_proxy.seen
    assert (first.method, first.path) == ("POST", "/v1/remove-background")
    assert first.upstream_status == 200 and not first.replayed, "the service did the work"
    assert (second.method, second.path, second.upstream_status) == (first.method, first.path, 200)
    assert first.idempotency_key and second.idempotency_key == first.idempotency_key
    assert second.replayed, "the retry got the stored answer"
    assert "credits charged: 10, remaining: 90" in done.stdout
    assert Image.open(tmp_path / "car-cutout.png").size == (480, 360)
    credits, rows = account_of(server, key)
    assert (credits, rows) == (90, 1), "one charge, one usage row"
