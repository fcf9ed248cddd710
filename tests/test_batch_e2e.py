"""`imgsvc batch` as a subprocess against the real server (SQLite, in-process pool, real model):
killed mid-run and resumed, nothing charged twice, outputs in the input's folder structure."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imgsvc.batch import STATE_NAME
from tests.utils import Server, linked_weights, photo_bytes, start_server, stop_server

PHOTOS = ("car.jpg", "cloth.jpg", "anime-girl.jpg")
TREE = ("shoes/1.jpg", "shoes/2.jpg", "shoes/3.jpg", "bags/4.jpg", "bags/5.jpg", "bags/big/6.jpg")


def small_jpeg(name: str, width: int = 64) -> bytes:
    img = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
    img.thumbnail((width, width))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("batch-e2e")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(tmp, weights, IMGSVC_JOBS_DIR=str(tmp / "jobs"))
    yield srv
    stop_server(srv)


def batch_command(server: Server, key: str, inputs: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imgsvc",
        "batch",
        "remove-background",
        str(inputs),
        "--out",
        str(out),
        "--api-url",
        server.url,
        "--key",
        key,
        "--chunk-size",
        "2",
        "--yes",
    ]


def run_batch(
    server: Server, key: str, inputs: Path, out: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_command(server, key, inputs, out),
        env=server.env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def state_of(out: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((out / STATE_NAME).read_bytes())
    except (FileNotFoundError, ValueError):
        return None  # not written yet (or, never, half written: it is renamed into place)
    return state


def balance(client: httpx.Client) -> int:
    return int(client.get("/v1/account").json()["credits"])


def usage_ids(client: httpx.Client) -> list[str]:
    return [row["request_id"] for row in client.get("/v1/usage").json()["data"]]


def job_ids(client: httpx.Client) -> list[str]:
    return [job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]


def quote(client: httpx.Client, inputs: Path, names: list[str]) -> int:
    r = client.post(
        "/v1/jobs?dry_run=true",
        data={"operation": "remove-background"},
        files=[("files", (n, (inputs / n).read_bytes(), "image/jpeg")) for n in names],
    )
    assert r.status_code == 200, r.text
    return int(r.json()["credits"])


def test_killed_batch_resumes_without_charging_twice(batch_server: Server, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    for n, name in enumerate(TREE):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(small_jpeg(PHOTOS[n % 3], 56 + 8 * n))
    key = batch_server.new_key(1000)
    with batch_server.client(key) as client:
        before = balance(client)
        price = quote(client, inputs, list(TREE))
        assert price > 0

        log = (tmp_path / "first-run.log").open("w")
        proc = subprocess.Popen(
            batch_command(batch_server, key, inputs, out),
            env=batch_server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                state = state_of(out)
                if state and state["chunks"] and state["chunks"][0]["job_id"]:
                    break  # the first chunk is submitted and recorded
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()

        state = state_of(out)
        assert state is not None and len(state["chunks"]) == 3
        assert [len(c["files"]) for c in state["chunks"]] == [2, 2, 2]
        assert not all(c["downloaded"] for c in state["chunks"])
        # The worst moment to die: the service took a submission, its job id never reached the
        # state file. Forget every recorded job id: the rerun must get the same jobs back.
        for chunk in state["chunks"]:
            chunk["job_id"] = None if not chunk["downloaded"] else chunk["job_id"]
        (out / STATE_NAME).write_text(json.dumps(state))

        done = run_batch(batch_server, key, inputs, out)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "failed: 0" in done.stdout
        for name in TREE:
            output = out / Path(name).with_suffix(".png")
            assert output.is_file(), name
            img = Image.open(output)
            assert img.mode == "RGBA"
            assert img.size == Image.open(inputs / name).size
        saved = sorted(
            p.relative_to(out).as_posix()
            for p in out.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
        )
        assert saved == sorted(str(Path(n).with_suffix(".png")) for n in TREE)

        assert balance(client) == before - price  # exactly the six items, once each
        ids = usage_ids(client)
        assert len(ids) == len(set(ids)) == len(TREE)
        jobs = job_ids(client)
        assert len(jobs) == 3  # the replays made no new job
        assert sorted(ids) == sorted(f"{job}.{n}" for job in jobs for n in (1, 2))
        final = state_of(out)
        assert final is not None and all(c["downloaded"] for c in final["chunks"])

        again = run_batch(batch_server, key, inputs, out)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "skipped (output exists): 6" in again.stdout
        assert balance(client) == before - price
        assert len(job_ids(client)) == 3
    batch_server.cli("billing", "verify")


def test_corrupt_images_exit_1_and_are_named(batch_server: Server, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = ["a.jpg", "c.jpg", "d.jpg"]
    for n, name in enumerate(good):
        (inputs / name).write_bytes(small_jpeg(PHOTOS[n], 48))
    (inputs / "b-broken.jpg").write_bytes(small_jpeg("car.jpg")[:300])  # truncated
    (inputs / "e-broken.jpg").write_bytes(b"this is not an image at all")
    # Chunks of 2: [a, b-broken] fails one item, [c, d] none, [e-broken] is refused whole.
    key = batch_server.new_key(1000)
    with batch_server.client(key) as client:
        before = balance(client)
        price = quote(client, inputs, good)
        done = run_batch(batch_server, key, inputs, out)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "succeeded: 3" in done.stdout
        assert "failed: 2" in done.stdout
        lines = done.stdout.splitlines()
        assert any(line.strip().startswith("b-broken.jpg: invalid_image") for line in lines)
        assert any(
            line.strip().startswith("e-broken.jpg: unsupported_media_type") for line in lines
        )
        assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c.png", "d.png"]
        assert balance(client) == before - price
        assert len(job_ids(client)) == 2

        again = run_batch(batch_server, key, inputs, out)  # retries the failed ones only
        assert again.returncode == 1, again.stdout + again.stderr
        assert "skipped (output exists): 3" in again.stdout
        assert "b-broken.jpg" in again.stdout and "e-broken.jpg" in again.stdout
        assert balance(client) == before - price
    batch_server.cli("billing", "verify")
