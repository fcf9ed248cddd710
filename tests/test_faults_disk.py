"""The job folder runs out of space (a 2 MiB tmpfs as IMGSVC_JOBS_DIR): a job whose inputs do
not fit is refused with 507 `insufficient_storage` and holds nothing; an item whose result does
not fit fails with that reason, uncharged; no partial file is left, and smaller work goes on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.faults import account_credits, files_under, small_tmpfs, wait_for
from tests.utils import Server, linked_weights, start_server, stop_server

CREDITS = 10_000
CHEAP = {"operation": "upscale", "model": "realesr-animevideov3"}


@dataclass(frozen=True)
class Setup:
    server: Server
    jobs: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("disk-faults")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    with small_tmpfs(tmp / "jobs", "2m") as jobs:
        server = start_server(
            tmp, weights, IMGSVC_JOBS_DIR=str(jobs), IMGSVC_PRELOAD_MODELS="false"
        )
        try:
            yield Setup(server, jobs)
        finally:
            stop_server(server)


def noise_png(edge: int, seed: int = 0) -> bytes:
    """A PNG that does not compress (about 3 bytes a pixel; 4x that for its upscale)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (edge, edge, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def finished(server: Server, key: str, job: str) -> dict[str, Any]:
    with server.client(key) as c:
        view: dict[str, Any] = {}

        def done() -> bool:
            view.update(c.get(f"/v1/jobs/{job}").json())
            return view["status"] not in ("queued", "running")

        wait_for("the job finished", done, detail=lambda: view)
        return view


def test_job_whose_inputs_do_not_fit_is_refused(setup: Setup) -> None:
    server = setup.server
    key = server.new_key(CREDITS)
    images = [("files", (f"n{i}.png", noise_png(600, seed=i), "image/png")) for i in range(3)]
    with server.client(key) as c:
        r = c.post("/v1/jobs", data=CHEAP, files=images)
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_storage"
    assert error["request_id"] == r.headers["X-Request-Id"]
    assert account_credits(server, key) == CREDITS
    assert files_under(setup.jobs) == []


def test_item_whose_result_does_not_fit_fails_uncharged(setup: Setup) -> None:
    server = setup.server
    key = server.new_key(CREDITS)
    with server.client(key) as c:
        big = [("files", ("n.png", noise_png(256), "image/png"))]  # result: about 3 MB
        r = c.post("/v1/jobs", data=CHEAP, files=big)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        view = finished(server, key, job)
        assert view["status"] == "failed", view
        (item,) = view["items"]
        assert item["error"]["code"] == "insufficient_storage", item
        assert item["attempts"] == 1
        assert account_credits(server, key) == CREDITS
        assert not [p for p in files_under(setup.jobs) if "/out/" in str(p)]  # no partial file

        small = [("files", ("s.png", noise_png(32), "image/png"))]
        r = c.post("/v1/jobs", data=CHEAP, files=small)
        assert r.status_code == 202, r.text
        assert finished(server, key, r.json()["id"])["status"] == "succeeded"
