"""The fleet: the API and `imgsvc worker` processes on the real RabbitMQ (and Redis) and the real
PostgreSQL. A worker killed mid-item loses nothing and charges nothing twice; a message
delivered twice is charged once."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from imgsvc.billing.db import Database
from imgsvc.billing.metering import ledger_mismatches
from imgsvc.billing.schema import UsageEvent
from imgsvc.jobs.fleet import TASK, make_celery, queue_name
from imgsvc.jobs.schema import JobItem
from imgsvc.operations.catalog import OPERATIONS
from tests.utils import Server, linked_weights, photo_bytes, start_server, stop_server

RABBITMQ = os.environ.get("IMGSVC_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("IMGSVC_TEST_REDIS", "redis://127.0.0.1:6379/0")
WORKER = [sys.executable, "-m", "imgsvc", "worker", "--operations", "remove-background"]
FINISHED = ("succeeded", "partially_failed", "failed", "canceled")


def photo(width: int, name: str = "car.jpg") -> bytes:
    img = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
    img.thumbnail((width, width))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def purge(broker: str) -> None:
    """Start from empty queues (messages of an earlier run would only be skipped, but cost time)."""
    app = make_celery(broker, item_timeout_s=60)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for op in OPERATIONS:
            queue = app.amqp.queues[queue_name(op)](channel)
            queue.declare()
            queue.purge()
    app.close()


class Fleet:
    def __init__(self, server: Server, tmp: Path) -> None:
        self.server, self.tmp = server, tmp
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*WORKER, "--name", f"{name}@test"],
            env=self.server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def wait_ready(self, names: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = [(self.tmp / f"{n}.log").read_text(errors="replace") for n in names]
            if all("worker ready for" in text and "ready." in text for text in logs):
                return
            for proc in self.workers:
                if proc.poll() is not None:
                    raise RuntimeError("a worker exited:\n" + "\n".join(logs))
            time.sleep(0.3)
        raise RuntimeError("workers not ready:\n" + "\n".join(logs))

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def fleet_server(
    tmp: Path, repo_weights: Path, database_url: str, broker: str
) -> tuple[Server, Fleet]:
    weights = linked_weights(tmp / "weights", repo_weights, None)
    server = start_server(
        tmp,
        weights,
        IMGSVC_DATABASE_URL=database_url,
        IMGSVC_BROKER_URL=broker,
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
        IMGSVC_JOB_LEASE_SECONDS="3",
        IMGSVC_JOB_SWEEP_SECONDS="0.5",
        IMGSVC_JOB_MAX_ATTEMPTS="3",
    )
    return server, Fleet(server, tmp)


def submit(client: httpx.Client, count: int, width: int) -> dict[str, Any]:
    names = ["car.jpg", "cloth.jpg", "anime-girl.jpg"]
    files = [
        ("files", (f"p{n:02d}.jpg", photo(width, names[n % 3]), "image/jpeg")) for n in range(count)
    ]
    r = client.post("/v1/jobs", data={"operation": "remove-background"}, files=files)
    assert r.status_code == 202, r.text
    return dict(r.json())


def wait_job(client: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = dict(client.get(f"/v1/jobs/{job_id}").json())
        if job["status"] in FINISHED:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job not finished: {job}")


def usage_rows(db: Database, job_id: str) -> list[tuple[int, int]]:
    with db.read() as s:
        return [
            (int(item), int(n))
            for item, n in s.execute(
                select(UsageEvent.item, func.count())
                .where(UsageEvent.job_id == job_id)
                .group_by(UsageEvent.item)
            )
        ]


@pytest.fixture
def rabbit_fleet(
    tmp_path: Path, repo_weights: Path, new_postgres_db: Callable[[], str]
) -> Iterator[tuple[Server, Fleet, Database]]:
    purge(RABBITMQ)
    url = new_postgres_db()
    server, fleet = fleet_server(tmp_path, repo_weights, url, RABBITMQ)
    db = Database(url)
    yield server, fleet, db
    fleet.stop()
    stop_server(server)
    db.dispose()


def test_worker_killed_mid_item_loses_nothing_and_charges_once(
    rabbit_fleet: tuple[Server, Fleet, Database],
) -> None:
    server, fleet, db = rabbit_fleet
    doomed = fleet.start_worker("w1")
    fleet.start_worker("w2")
    fleet.wait_ready(["w1", "w2"])
    key = server.new_key(100_000)
    with server.client(key) as client:
        before = int(client.get("/v1/account").json()["credits"])
        job = submit(client, 20, 320)
        # Kill w1 while it holds an item (its lease names its pid).
        deadline = time.monotonic() + 120
        killed_item = None
        while time.monotonic() < deadline and killed_item is None:
            with db.read() as s:
                killed_item = s.scalar(
                    select(JobItem.item).where(
                        JobItem.job_id == job["id"],
                        JobItem.status == "running",
                        JobItem.lease_owner.like(f"%:{doomed.pid}:%"),
                    )
                )
            time.sleep(0.05)
        assert killed_item is not None, "w1 never took an item"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)

        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"]["succeeded"] == 20
        rows = usage_rows(db, job["id"])
        assert sorted(item for item, _ in rows) == list(range(1, 21))
        assert all(n == 1 for _, n in rows), rows
        charged = sum(it["credits"] for it in done["items"])
        assert charged == done["credits"]["charged"] == done["credits"]["quoted"]
        assert int(client.get("/v1/account").json()["credits"]) == before - charged
        again = next(it for it in done["items"] if it["item"] == killed_item)
        assert again["attempts"] >= 2  # the killed attempt, then the one that finished

        # The same message published again for a finished item: skipped, not charged.
        with db.read() as s:
            item_ids = list(s.scalars(select(JobItem.id).where(JobItem.job_id == job["id"])))
        app = make_celery(RABBITMQ, item_timeout_s=60)
        for item_id in item_ids[:5]:
            app.send_task(TASK, args=[item_id], queue=queue_name("remove-background"))
        # And a new one-item job whose message is delivered three times more.
        single = submit(client, 1, 96)
        with db.read() as s:
            (single_id,) = s.scalars(select(JobItem.id).where(JobItem.job_id == single["id"]))
        for _ in range(3):
            app.send_task(TASK, args=[single_id], queue=queue_name("remove-background"))
        app.close()
        assert wait_job(client, single["id"])["status"] == "succeeded"
        time.sleep(2)  # let the duplicates be consumed
        assert usage_rows(db, single["id"]) == [(1, 1)]
        assert all(n == 1 for _, n in usage_rows(db, job["id"]))
    assert ledger_mismatches(db) == []
    assert "ledger ok" in server.cli("billing", "verify")
    log = (fleet.tmp / "w2.log").read_text()
    assert "skipped" in log  # the duplicates reached the live worker and did nothing


def test_redis_broker_smoke(
    tmp_path: Path, repo_weights: Path, new_postgres_db: Callable[[], str]
) -> None:
    purge(REDIS)
    url = new_postgres_db()
    server, fleet = fleet_server(tmp_path, repo_weights, url, REDIS)
    db = Database(url)
    try:
        fleet.start_worker("r1")
        fleet.wait_ready(["r1"])
        with server.client(server.new_key(10_000)) as client:
            job = submit(client, 3, 96)
            done = wait_job(client, job["id"])
        assert done["status"] == "succeeded"
        assert [n for _, n in usage_rows(db, job["id"])] == [1, 1, 1]
        assert ledger_mismatches(db) == []
    finally:
        fleet.stop()
        stop_server(server)
        db.dispose()
