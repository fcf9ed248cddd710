"""Batch jobs over HTTP on the embedded default (SQLite + the in-process pool), real models."""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from imgsvc.billing.db import Database
from imgsvc.billing.metering import ledger_mismatches
from imgsvc.jobs.webhooks import new_secret as webhooks_new_secret
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


def serve_jobs(
    factory: pytest.TempPathFactory, repo_weights: Path, name: str, **env: str
) -> Iterator[Server]:
    """A real server on its own SQLite database and job folder, sweeping every 0.5 s."""
    tmp = factory.mktemp(name)
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(
        tmp, weights, IMGSVC_JOBS_DIR=str(tmp / "jobs"), IMGSVC_JOB_SWEEP_SECONDS="0.5", **env
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    yield from serve_jobs(
        tmp_path_factory,
        repo_weights,
        "jobs",
        IMGSVC_URL_FETCH_ALLOW_CIDRS="127.0.0.1/32",
        IMGSVC_WEBHOOK_RETRY_SCHEDULE="0.2,0.2,0.2",
    )


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


# --- helpers of the tests below -------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (48, 32), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_files(n: int, width: int = 64) -> list[tuple[str, tuple[str, bytes, str]]]:
    names = ["car.jpg", "cloth.jpg", "anime-girl.jpg"]
    return [
        ("files", (f"p{i}.jpg", small_jpeg(names[i % 3], width), "image/jpeg")) for i in range(n)
    ]


def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/jobs", params={"limit": 100}).json()["jobs"])


def ledger_clean(server: Server) -> None:
    """`imgsvc billing verify` exits 0 (Server.cli raises otherwise) and no balance is off."""
    server.cli("billing", "verify")
    db = Database(server.env["IMGSVC_DATABASE_URL"])
    try:
        assert ledger_mismatches(db) == []
    finally:
        db.dispose()


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class _Hooks(ThreadingHTTPServer):
    """A webhook receiver: each path answers the statuses of its plan in turn (then the last)."""

    def __init__(self, plan: dict[str, list[int]]) -> None:
        super().__init__(("127.0.0.1", 0), _HookHandler)
        self.plan = plan
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def calls_to(self, path: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [c for c in self.calls if c[0] == path]


class _HookHandler(BaseHTTPRequestHandler):
    server: _Hooks

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with self.server.lock:
            self.server.calls.append(
                (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            seen = sum(1 for c in self.server.calls if c[0] == self.path)
        plan = self.server.plan.get(self.path, [200])
        self.send_response(plan[min(seen, len(plan)) - 1])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def hooks() -> Iterator[_Hooks]:
    httpd = _Hooks({"/flaky": [500, 500, 200], "/gone": [410]})
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# --- webhooks -------------------------------------------------------------------------------


def test_webhook_is_signed_retried_on_500_and_stops_on_410(
    jobs_server: Server, hooks: _Hooks
) -> None:
    key = jobs_server.new_key(1000)
    with jobs_server.client(key) as client:
        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background", "webhook_url": hooks.url("/flaky")},
            files=jpeg_files(1),
        )
        assert r.status_code == 202, r.text
        job = r.json()
        secret = job["webhook_secret"]
        assert secret.startswith("whsec_")
        calls = wait_for("the third webhook attempt", lambda: len(hooks.calls_to("/flaky")) >= 3)
        assert calls
        time.sleep(1.0)  # a fourth attempt would come within the retry schedule (0.2 s)
        calls = hooks.calls_to("/flaky")
        assert len(calls) == 3
        _, headers, body = calls[-1]
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
        Webhook(secret).verify(body, headers)  # raises WebhookVerificationError if not signed
        assert len({c[1]["webhook-id"] for c in calls}) == 1  # one message, three attempts
        payload = json.loads(body)
        assert payload["type"] == "job.finished"
        assert payload["data"]["id"] == job["id"]
        assert payload["data"]["status"] == "succeeded"
        assert payload["data"]["result_url"] == f"{jobs_server.url}/v1/jobs/{job['id']}/result"
        assert client.get(payload["data"]["result_url"]).status_code == 200
        seen = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
        assert seen["status"] == "delivered"
        assert [d["status_code"] for d in seen["deliveries"]] == [500, 500, 200]
        assert [d["attempt"] for d in seen["deliveries"]] == [1, 2, 3]
        with pytest.raises(WebhookVerificationError):
            Webhook(webhooks_new_secret()).verify(body, headers)

        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background", "webhook_url": hooks.url("/gone")},
            files=jpeg_files(1),
        )
        assert r.status_code == 202, r.text
        assert "webhook_secret" not in r.json()  # shown once per key
        gone = r.json()["id"]
        wait_for(
            "the 410 to be final",
            lambda: client.get(f"/v1/jobs/{gone}").json()["webhook"]["status"] == "failed",
        )
        time.sleep(1.0)
        assert len(hooks.calls_to("/gone")) == 1
        deliveries = client.get(f"/v1/jobs/{gone}").json()["webhook"]["deliveries"]
        assert [d["status_code"] for d in deliveries] == [410]
        Webhook(secret).verify(hooks.calls_to("/gone")[0][2], hooks.calls_to("/gone")[0][1])


def test_webhook_to_a_private_address_is_refused_uncharged(jobs_server: Server) -> None:
    key = jobs_server.new_key(1000)
    with jobs_server.client(key) as client:
        before = balance(client)
        r = client.post(
            "/v1/jobs",
            data={
                "operation": "remove-background",
                "webhook_url": "http://169.254.169.254/latest/meta-data",
            },
            files=jpeg_files(1),
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "url_not_allowed"
        assert balance(client) == before
        assert job_count(client) == 0
        # The refused job made no signing secret: the key's first real webhook job shows one.
        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background", "webhook_url": "http://127.0.0.1:9/x"},
            files=jpeg_files(1),
        )
        assert r.status_code == 202, r.text
        assert r.json()["webhook_secret"].startswith("whsec_")
        wait_finished(client, r.json()["id"])


def test_a_job_refused_for_credits_does_not_use_up_the_secret(jobs_server: Server) -> None:
    key = jobs_server.new_key(0)
    with jobs_server.client(key) as client:
        form = {"operation": "remove-background", "webhook_url": "http://127.0.0.1:9/x"}
        r = client.post("/v1/jobs", data=form, files=jpeg_files(1))
        assert r.status_code == 402, r.text
        key_id = int(client.get("/v1/account").json()["id"])
        jobs_server.cli("keys", "topup", str(key_id), "100")
        r = client.post("/v1/jobs", data=form, files=jpeg_files(1))
        assert r.status_code == 202, r.text
        assert r.json()["webhook_secret"].startswith("whsec_")
        wait_finished(client, r.json()["id"])


# --- Idempotency-Key, cancel -----------------------------------------------------------------


def test_idempotency_key_returns_the_same_job_and_charges_once(jobs_server: Server) -> None:
    key = jobs_server.new_key(1000)
    files = jpeg_files(2)
    with jobs_server.client(key) as client:
        before = balance(client)
        headers = {"Idempotency-Key": "batch-chunk-1"}
        form = {"operation": "remove-background", "format": "png"}
        first = client.post("/v1/jobs", data=form, files=files, headers=headers)
        assert first.status_code == 202, first.text
        assert "idempotent-replayed" not in first.headers
        again = client.post("/v1/jobs", data=form, files=files, headers=headers)
        assert again.status_code == 202, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        other = client.post("/v1/jobs", data=form, files=jpeg_files(3), headers=headers)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        done = wait_finished(client, first.json()["id"])
        assert done["status"] == "succeeded"
        assert job_count(client) == 1
        charged = done["credits"]["charged"]
        assert charged == first.json()["credits"]["quoted"] > 0
        assert balance(client) == before - charged
        rows = client.get("/v1/usage").json()["data"]
        ids = [row["request_id"] for row in rows]
        assert sorted(ids) == [f"{done['id']}.1", f"{done['id']}.2"]
    ledger_clean(jobs_server)


def test_cancel_releases_what_has_not_run(jobs_server: Server) -> None:
    key = jobs_server.new_key(1000)
    with jobs_server.client(key) as client:
        before = balance(client)
        r = client.post("/v1/jobs", data={"operation": "remove-background"}, files=jpeg_files(8))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert balance(client) == before - r.json()["credits"]["quoted"]  # all held
        canceled = client.delete(f"/v1/jobs/{job_id}")
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] in ("running", "canceled", "queued")
        done = wait_finished(client, job_id)
        assert done["status"] == "canceled"
        items = done["items"]
        not_run = [it for it in items if it["status"] == "canceled"]
        ran = [it for it in items if it["status"] == "succeeded"]
        assert len(not_run) >= 4 and len(not_run) + len(ran) == 8
        assert all(it["credits"] == 0 for it in not_run)
        assert done["progress"]["canceled"] == len(not_run)
        charged = sum(it["credits"] for it in ran)
        assert done["credits"]["charged"] == charged
        assert balance(client) == before - charged
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
        assert client.get(f"/v1/jobs/{job_id}/items/{not_run[0]['item']}").status_code == 409
        zf = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job_id}/result").content))
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert sum(row["status"] == "canceled" for row in rows) == len(not_run)
    ledger_clean(jobs_server)


# --- URLs, Prefer: respond-async, scopes ----------------------------------------------------


def test_urls_job_fetches_public_urls_and_fails_private_ones_uncharged(
    jobs_server: Server, origin: str
) -> None:
    assert httpx.get(f"{origin}/car.jpg").status_code == 200
    key = jobs_server.new_key(1000)
    with jobs_server.client(key) as client:
        before = balance(client)
        r = client.post(
            "/v1/jobs",
            json={
                "operation": "remove-background",
                "options": {"size": "preview"},
                "urls": [f"{origin}/car.jpg", "http://169.254.169.254/x"],
            },
        )
        assert r.status_code == 202, r.text
        done = wait_finished(client, r.json()["id"])
        assert done["status"] == "partially_failed"
        first, second = done["items"]
        assert first["status"] == "succeeded" and first["name"] == "car.jpg"
        assert second["status"] == "failed" and second["error"]["code"] == "url_not_allowed"
        assert second["credits"] == 0
        assert balance(client) == before - first["credits"] == before - done["credits"]["charged"]
        out = Image.open(io.BytesIO(client.get(first["url"]).content))
        assert out.mode == "RGBA"
        assert out.size == (first["output_width"], first["output_height"])
        only_private = client.post(
            "/v1/jobs",
            json={"operation": "remove-background", "urls": ["http://10.0.0.1/a.jpg"]},
        )
        assert only_private.status_code == 422
        assert only_private.json()["error"]["failed"][0]["error"]["code"] == "url_not_allowed"
    ledger_clean(jobs_server)


def test_prefer_respond_async_makes_a_one_item_job(jobs_server: Server, origin: str) -> None:
    key = jobs_server.new_key(1000)
    photo = small_jpeg(width=80)
    with jobs_server.client(key) as client:
        before = balance(client)
        prefer = {"Prefer": "respond-async"}
        quote = client.post(
            "/v1/remove-background?dry_run=true", files={"image": photo}, headers=prefer
        )
        assert quote.status_code == 200 and "credits" in quote.json()  # dry run wins
        assert job_count(client) == 0
        r = client.post(
            "/v1/remove-background",
            data={"format": "png"},
            files={"image": ("car.jpg", photo, "image/jpeg")},
            headers={**prefer, "Idempotency-Key": "async-1"},
        )
        assert r.status_code == 202, r.text
        assert r.headers["preference-applied"] == "respond-async"
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["progress"]["total"] == 1
        assert job["credits"]["quoted"] == quote.json()["credits"]
        again = client.post(
            "/v1/remove-background",
            data={"format": "png"},
            files={"image": ("car.jpg", photo, "image/jpeg")},
            headers={**prefer, "Idempotency-Key": "async-1"},
        )
        assert again.status_code == 202 and again.json()["id"] == job["id"]
        assert again.headers["idempotent-replayed"] == "true"
        done = wait_finished(client, job["id"])
        assert done["status"] == "succeeded"
        out = client.get(f"/v1/jobs/{job['id']}/items/1")
        assert out.status_code == 200 and out.headers["content-type"] == "image/png"
        assert out.content.startswith(b"\x89PNG\r\n\x1a\n")
        img = Image.open(io.BytesIO(out.content))
        img.load()
        assert img.mode == "RGBA" and img.size == Image.open(io.BytesIO(photo)).size
        assert balance(client) == before - quote.json()["credits"]
        assert job_count(client) == 1

        # image_url and a background image become the job's input and shared file.
        r = client.post(
            "/v1/remove-background",
            data={"image_url": f"{origin}/car.jpg", "size": "preview", "format": "jpg"},
            files={"bg_image": ("bg.png", png_bytes((40, 40)), "image/png")},
            headers=prefer,
        )
        assert r.status_code == 202, r.text
        done = wait_finished(client, r.json()["id"])
        assert done["status"] == "succeeded", done
        out = client.get(f"/v1/jobs/{done['id']}/items/1")
        assert out.headers["content-type"] == "image/jpeg"
        # Refused as the synchronous call is: nothing stored, nothing held.
        bad = client.post(
            "/v1/remove-background",
            data={"image_url": "http://169.254.169.254/x"},
            headers=prefer,
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "url_not_allowed"
        bad = client.post(
            "/v1/remove-background",
            files={"image": photo, "bg_image": ("bg.png", b"not an image", "image/png")},
            headers=prefer,
        )
        assert bad.status_code in (415, 422), bad.text
        assert job_count(client) == 2

        # Upscale and inpaint (with its mask) go the same way.
        r = client.post(
            "/v1/upscale",
            data={"scale": "2"},
            files={"image": ("s.png", png_bytes((24, 16)), "image/png")},
            headers=prefer,
        )
        assert r.status_code == 202, r.text
        up = wait_finished(client, r.json()["id"])
        assert up["status"] == "succeeded" and (up["items"][0]["output_width"]) == 48
        mask = Image.new("L", (48, 32), 0)
        mask.paste(255, (10, 10, 20, 20))
        buf = io.BytesIO()
        mask.save(buf, "PNG")
        r = client.post(
            "/v1/inpaint",
            files={"image": ("i.png", png_bytes(), "image/png"), "mask": buf.getvalue()},
            headers=prefer,
        )
        assert r.status_code == 202, r.text
        inpainted = wait_finished(client, r.json()["id"])
        assert inpainted["status"] == "succeeded", inpainted
        wrong_mask = client.post(
            "/v1/inpaint",
            files={"image": png_bytes(), "mask": png_bytes((10, 10))},
            headers=prefer,
        )
        assert wrong_mask.status_code == 422, wrong_mask.text
        assert job_count(client) == 4
    ledger_clean(jobs_server)


def test_a_key_without_the_scope_cannot_submit_that_operation(jobs_server: Server) -> None:
    out = jobs_server.cli(
        "keys", "create", "--name", "up-only", "--credits", "100", "--scopes", "upscale"
    )
    key = out.splitlines()[-1]
    with jobs_server.client(key) as client:
        r = client.post("/v1/jobs", data={"operation": "remove-background"}, files=jpeg_files(1))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        r = client.post(
            "/v1/jobs",
            json={"operation": "remove-background", "urls": ["http://127.0.0.1:9/a.jpg"]},
        )
        assert r.status_code == 403
        r = client.post(
            "/v1/remove-background",
            files={"image": small_jpeg()},
            headers={"Prefer": "respond-async"},
        )
        assert r.status_code == 403
        assert balance(client) == 100
        assert job_count(client) == 0


# --- a second server: small limits, results kept one second ----------------------------------


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    yield from serve_jobs(
        tmp_path_factory,
        repo_weights,
        "jobs-tight",
        IMGSVC_JOB_RETENTION_HOURS="0.0003",  # about a second
        IMGSVC_JOB_MAX_ITEMS="3",
        IMGSVC_JOB_MAX_BYTES="300000",
    )


def jobs_dir(server: Server) -> Path:
    return Path(server.env["IMGSVC_JOBS_DIR"])


def job_folders(server: Server) -> set[str]:
    folder = jobs_dir(server)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_finished_jobs_expire_with_their_files(tight_server: Server) -> None:
    key = tight_server.new_key(100)
    with tight_server.client(key) as client:
        r = client.post("/v1/jobs", data={"operation": "remove-background"}, files=jpeg_files(1))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert (jobs_dir(tight_server) / job_id).is_dir()
        wait_finished(client, job_id)
        paths = (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/items/1")
        time.sleep(3)
        assert [client.get(p).status_code for p in paths] == [404, 404, 404]
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert not (jobs_dir(tight_server) / job_id).exists()
        assert job_id not in json.dumps(client.get("/v1/jobs").json())
        assert balance(client) < 100  # what ran stays charged


def zip_info(name: str, *, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    if mode is not None:
        info.external_attr = mode << 16
    return info


def zip_with(*members: tuple[zipfile.ZipInfo | str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


def test_unsafe_zips_are_refused_whole_and_write_nothing(tight_server: Server) -> None:
    photo = small_jpeg(width=48)
    attacks = {
        "zip slip": (zip_with(("ok.jpg", photo), ("../evil.png", photo)), 422, "unsafe_archive"),
        "absolute": (
            zip_with(
                ("/tmp/evil-abs.png", photo),
            ),
            422,
            "unsafe_archive",
        ),
        "symlink": (
            zip_with(("ok.jpg", photo), (zip_info("evil-link.png", mode=0o120777), b"/etc")),
            422,
            "unsafe_archive",
        ),
        "ratio bomb": (
            zip_with(
                (zip_info("evil-zeros.png"), b"\0" * (50 * 1024 * 1024)),
            ),
            413,
            "archive_too_large",
        ),
        "too many members": (
            zip_with(*[(f"p{n}.jpg", photo) for n in range(5)]),
            413,
            "archive_too_large",
        ),
        "not a zip after all": (b"PK\x03\x04" + b"\x00" * 100, 422, "invalid_archive"),
    }
    key = tight_server.new_key(100)
    root = Path(tight_server.env["IMGSVC_DATABASE_URL"].removeprefix("sqlite:///")).parent
    with tight_server.client(key) as client:
        folders = job_folders(tight_server)
        for what, (data, status, code) in attacks.items():
            for dry_run in ("true", "false"):
                r = client.post(
                    "/v1/jobs",
                    params={"dry_run": dry_run},
                    data={"operation": "remove-background"},
                    files={"file": ("photos.zip", data, "application/zip")},
                )
                assert r.status_code == status, (what, r.text)
                assert r.json()["error"]["code"] == code, what
        assert balance(client) == 100
        assert job_count(client) == 0
        assert job_folders(tight_server) == folders
        assert not [p for p in root.rglob("evil*")]
        assert not Path("/tmp/evil-abs.png").exists()

        inner = zip_with(("inner.jpg", photo))
        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background"},
            files={"file": ("photos.zip", zip_with(("ok.jpg", photo), ("inner.zip", inner)))},
        )
        assert r.status_code == 202, r.text
        done = wait_finished(client, r.json()["id"])
        nested = {it["name"]: it for it in done["items"]}["inner.zip"]
        assert nested["status"] == "failed" and nested["error"]["code"] == "nested_archive"
        assert nested["credits"] == 0
        assert balance(client) == 100 - done["credits"]["charged"]
        only_nested = client.post(
            "/v1/jobs",
            data={"operation": "remove-background"},
            files={
                "file": (
                    "photos.zip",
                    zip_with(
                        ("inner.zip", inner),
                    ),
                )
            },
        )
        assert only_nested.status_code == 422, only_nested.text
        assert not [p for p in root.rglob("inner.jpg")]
    ledger_clean(tight_server)


def test_job_limits_are_refused_before_any_work(tight_server: Server) -> None:
    key = tight_server.new_key(100)
    photo = small_jpeg(width=48)
    with tight_server.client(key) as client:
        folders = job_folders(tight_server)
        for n in (4, 12):  # over IMGSVC_JOB_MAX_ITEMS, and over what the form parser reads
            r = client.post(
                "/v1/jobs",
                data={"operation": "remove-background"},
                files=[("files", (f"p{i}.jpg", photo, "image/jpeg")) for i in range(n)],
            )
            assert r.status_code == 413, (n, r.text)
        r = client.post(
            "/v1/jobs",
            json={"operation": "remove-background", "urls": ["http://127.0.0.1:9/a"] * 4},
        )
        assert r.status_code == 413, r.text
        big = png_bytes()[:40] + os.urandom(320_000)  # over IMGSVC_JOB_MAX_BYTES (300000)
        r = client.post(
            "/v1/jobs",
            data={"operation": "remove-background"},
            files={"files": ("big.png", big, "image/png")},
        )
        assert r.status_code == 413, r.text
        assert "300000" in r.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            boundary = b"--xyz\r\n"
            yield boundary + b'Content-Disposition: form-data; name="operation"\r\n\r\n'
            yield b"remove-background\r\n" + boundary
            yield b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n'
            yield b"Content-Type: image/png\r\n\r\n"
            for _ in range(40):
                yield os.urandom(10_000)
            yield b"\r\n--xyz--\r\n"

        r = client.post(
            "/v1/jobs",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code == 413, r.text
        assert balance(client) == 100
        assert job_count(client) == 0
        assert job_folders(tight_server) == folders
