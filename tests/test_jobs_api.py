"""Batch jobs over HTTP on the embedded default (SQLite + the in-process pool), real models."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imgsvc.billing.db import Database
from imgsvc.billing.metering import ledger_mismatches
from tests.utils import Server, linked_weights, photo_bytes, start_server, stop_server


def small_jpeg(name: str = "car.jpg", width: int = 96) -> bytes:
    img = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
    img.thumbnail((width, width))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("jobs")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(
        tmp,
        weights,
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
        IMGSVC_JOB_SWEEP_SECONDS="0.5",
        IMGSVC_URL_FETCH_ALLOW_CIDRS="127.0.0.1/32",
        IMGSVC_WEBHOOK_RETRY_SCHEDULE="0.2,0.2,0.2",
    )
    yield srv
    stop_server(srv)


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "partially_failed", "failed", "canceled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def balance(client: httpx.Client) -> int:
    return int(client.get("/v1/account").json()["credits"])


def test_zip_of_five_photos_with_one_corrupt_entry(jobs_server: Server, tmp_path: Path) -> None:
    key = jobs_server.new_key(1000)
    photos = {
        f"shop/p{n}.jpg": small_jpeg(name)
        for n, name in enumerate(
            ["car.jpg", "cloth.jpg", "anime-girl.jpg", "car.jpg", "cloth.jpg"], start=1
        )
    }
    photos["shop/broken.jpg"] = small_jpeg()[:200]
    with jobs_server.client(key) as client:
        before = balance(client)
        quote = client.post(
            "/v1/jobs?dry_run=true",
            data={"operation": "remove-background"},
            files={"file": ("photos.zip", zip_of(photos), "application/zip")},
        )
        assert quote.status_code == 200, quote.text
        assert quote.json()["items"] == 5 and len(quote.json()["failed"]) == 1
        assert balance(client) == before
        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background", "format": "png"},
            files={"file": ("photos.zip", zip_of(photos), "application/zip")},
        )
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["credits"]["quoted"] == quote.json()["credits"]
        done = wait_finished(client, job["id"])
        assert done["status"] == "partially_failed"
        by_name = {it["name"]: it for it in done["items"]}
        assert by_name["shop/broken.jpg"]["status"] == "failed"
        assert by_name["shop/broken.jpg"]["error"]["code"] == "invalid_image"
        assert sum(it["status"] == "succeeded" for it in done["items"]) == 5
        charged = sum(it["credits"] for it in done["items"] if it["status"] == "succeeded")
        assert charged == done["credits"]["charged"] == quote.json()["credits"]
        assert balance(client) == before - charged

        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert result.status_code == 200
        assert result.headers["content-type"] == "application/zip"
        zf = zipfile.ZipFile(io.BytesIO(result.content))
        names = set(zf.namelist())
        assert {f"shop/p{n}.png" for n in range(1, 6)} <= names
        assert {"manifest.csv", "manifest.json"} <= names
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert len(rows) == 6
        failed = [r for r in rows if r["status"] == "failed"]
        assert failed[0]["input_name"] == "shop/broken.jpg" and failed[0]["credits"] == "0"
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["credits_charged"] == charged
        out = Image.open(io.BytesIO(zf.read("shop/p1.png")))
        assert out.mode == "RGBA"

        one = client.get(f"/v1/jobs/{job['id']}/items/1")
        assert one.status_code == 200 and one.content == zf.read("shop/p1.png")

        usage = client.get("/v1/usage").json()
        assert json.dumps(usage).count(job["id"]) >= 0  # usage lists the items' request ids

    with jobs_server.client(jobs_server.new_key(10)) as other:
        for path in ("", "/result", "/items/1"):
            assert other.get(f"/v1/jobs/{job['id']}{path}").status_code == 404
        assert other.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert job["id"] not in json.dumps(other.get("/v1/jobs").json())
    db = Database(jobs_server.env["IMGSVC_DATABASE_URL"])
    assert ledger_mismatches(db) == []
    db.dispose()
