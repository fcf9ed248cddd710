"""Clients that hang up mid-upload or mid-download.

Mid-upload: nothing is charged, the upload spooled to disk is closed and gone, no job folder is
left. Mid-download: the result was charged when it was made (once); a retry with the same
Idempotency-Key, or downloading a job's result again, gets it without a second charge, and the
server holds no file of the abandoned download open.
(A client that hangs up while its call is still running: tests/test_client_gone.py.)
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults import (
    RawHttp,
    account_credits,
    files_under,
    multipart,
    open_files_under,
    read_books,
    wait_for,
)
from tests.utils import Server, linked_weights, start_server, stop_server

CREDITS = 10_000
UPLOAD_BYTES = 3 * 1024 * 1024  # past the 1 MiB a form keeps in memory: spooled to disk
CHEAP = {"model": "realesr-animevideov3"}


@dataclass(frozen=True)
class Setup:
    server: Server
    spool: Path  # TMPDIR of the server: where uploads spool
    jobs: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("client-faults")
    spool, jobs = tmp / "spool", tmp / "jobs"
    spool.mkdir()
    weights = linked_weights(tmp / "weights", repo_weights, None)
    server = start_server(
        tmp,
        weights,
        TMPDIR=str(spool),
        IMGSVC_JOBS_DIR=str(jobs),
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_DEFAULT_RATE_LIMIT="1000/minute",
    )
    yield Setup(server, spool, jobs)
    stop_server(server)


def noise_png(edge: int, seed: int = 0) -> bytes:
    """A PNG that does not compress: its 4x upscale is megabytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (edge, edge, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def spooled_files(s: Setup) -> list[str]:
    """Named or deleted files under the spool folder the server holds open."""
    return open_files_under(s.server.proc.pid, s.spool)


@pytest.mark.parametrize(
    ("path", "field", "fields"),
    [
        ("/v1/upscale", "image", CHEAP),
        ("/v1/jobs", "files", {"operation": "upscale", **CHEAP}),
    ],
)
def test_hang_up_mid_upload(setup: Setup, path: str, field: str, fields: dict[str, str]) -> None:
    server = setup.server
    key = server.new_key(CREDITS)
    upload = os.urandom(UPLOAD_BYTES)
    content_type, body = multipart(fields, {field: ("big.png", upload, "image/png")})
    raw = RawHttp(server.url)
    raw.send_head(
        "POST",
        path,
        {"X-API-Key": key, "Content-Type": content_type, "Content-Length": str(len(body))},
    )
    raw.send(body[: len(body) // 2])
    wait_for("the upload spools to disk", lambda: spooled_files(setup) != [])
    raw.hang_up()
    wait_for(
        "the spooled upload is closed",
        lambda: spooled_files(setup) == [],
        detail=lambda: spooled_files(setup),
    )
    assert [p for p in files_under(setup.spool) if "torchinductor" not in str(p)] == []
    assert files_under(setup.jobs) == []
    assert account_credits(server, key) == CREDITS
    with server.client(key) as c:
        assert c.get("/v1/usage").json()["data"] == []
        r = c.post("/v1/upscale", files={"image": ("s.png", noise_png(8), "image/png")}, data=CHEAP)
        assert r.status_code == 200, r.text  # the server is none the worse


def test_hang_up_mid_download_then_retry_with_idempotency_key(setup: Setup) -> None:
    server = setup.server
    key = server.new_key(CREDITS)
    content_type, body = multipart(CHEAP, {"image": ("n.png", noise_png(256), "image/png")})
    headers = {"X-API-Key": key, "Idempotency-Key": "fault-download-1"}
    raw = RawHttp(server.url, receive_buffer=4096)
    raw.send_head(
        "POST",
        "/v1/upscale",
        {**headers, "Content-Type": content_type, "Content-Length": str(len(body))},
    )
    raw.send(body)
    status, head, _ = raw.read_head()
    assert status == 200
    size = int(head["content-length"])
    raw.read_some(1024)
    raw.hang_up()  # a few KB of megabytes read

    charged = int(head["x-credits-charged"])
    with server.client() as c:
        again = c.post(
            "/v1/upscale",
            headers=headers,
            files={"image": ("n.png", noise_png(256), "image/png")},
            data=CHEAP,
        )
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(again.content) == size
    assert Image.open(io.BytesIO(again.content)).size == (1024, 1024)
    assert account_credits(server, key) == CREDITS - charged  # made and charged once
    usage = read_books(server.env["IMGSVC_DATABASE_URL"]).usage
    assert usage[head["x-request-id"]] == charged


def test_hang_up_mid_job_result_download(setup: Setup) -> None:
    server = setup.server
    key = server.new_key(CREDITS)
    images = [("files", (f"n{i}.png", noise_png(256, seed=i), "image/png")) for i in range(3)]
    with server.client(key) as c:
        r = c.post("/v1/jobs", data={"operation": "upscale", **CHEAP}, files=images)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_for(
            "the job finished", lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
        )
    after_job = account_credits(server, key)
    assert after_job < CREDITS

    raw = RawHttp(server.url, receive_buffer=4096)
    raw.send_head("GET", f"/v1/jobs/{job}/result", {"X-API-Key": key})
    status, _, _ = raw.read_head()
    assert status == 200
    pid = server.proc.pid
    # Megabytes of zip against a small window: the server is stuck mid-stream, a file open.
    wait_for("the result is streaming", lambda: open_files_under(pid, setup.jobs) != [])
    raw.hang_up()
    wait_for(
        "the abandoned download's files are closed",
        lambda: open_files_under(pid, setup.jobs) == [],
        detail=lambda: open_files_under(pid, setup.jobs),
    )
    with server.client(key) as c:
        full = c.get(f"/v1/jobs/{job}/result")
    assert full.status_code == 200
    with zipfile.ZipFile(io.BytesIO(full.content)) as archive:
        assert archive.testzip() is None
        pngs = [n for n in archive.namelist() if n.endswith(".png")]
    assert len(pngs) == 3
    assert account_credits(server, key) == after_job  # downloads are not charged
