"""The job store on SQLite and PostgreSQL: holds up front, leases, duplicates, poison items."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imgsvc.billing import keys
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import ledger_mismatches
from imgsvc.billing.schema import Hold, UsageEvent
from imgsvc.errors import InsufficientCredits, InvalidImage
from imgsvc.jobs import store
from imgsvc.jobs.files import JobFiles
from imgsvc.jobs.schema import JobItem

LEASE = timedelta(seconds=30)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def new_key(db: Database, credits: int) -> KeyInfo:
    info, _ = keys.create_key(db, name="jobs", credits=credits)
    return info


def make_job(db: Database, files: JobFiles, key: KeyInfo, prices: list[int], bad: int = 0) -> str:
    items = [store.NewItem(f"p{n}.png", b"image bytes", c, "v1") for n, c in enumerate(prices)]
    items += [store.NewItem(f"bad{n}.png", None, error=InvalidImage("corrupt")) for n in range(bad)]
    job = store.NewJob("upscale", {}, items, {}, "req_test", "http://api/v1/jobs")
    return store.create(db, files, key, job, hold_ttl=timedelta(hours=1)).id


def item_ids(db: Database, job_id: str) -> list[int]:
    with db.read() as s:
        return list(
            s.scalars(select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.item))
        )


def output(credits: int) -> store.Output:
    return store.Output(
        path="out/x.png",
        ext=".png",
        media_type="image/png",
        model="m",
        model_version=None,
        input_size=(10, 10),
        output_size=(20, 20),
        credits=credits,
        price_version="v1",
        duration_ms=5,
    )


def test_holds_are_taken_for_the_whole_job_or_not_at_all(db: Database, tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    key = new_key(db, 25)
    with pytest.raises(InsufficientCredits) as refused:
        make_job(db, files, key, [10, 10, 10])
    assert refused.value.extra["credits_required"] == 30
    assert keys.get_key(db, key.id).credits == 25
    assert files.job_ids_on_disk() == []  # a refused job leaves no file behind
    job_id = make_job(db, files, key, [10, 10], bad=1)
    assert keys.get_key(db, key.id).credits == 5
    _, items = store.get(db, job_id, key.id)
    assert [it.status for it in items] == ["queued", "queued", "failed"]
    assert items[2].error_code == "invalid_image" and items[2].hold_id is None
    assert ledger_mismatches(db) == []


def test_a_second_delivery_is_never_charged(db: Database, tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    key = new_key(db, 100)
    job_id = make_job(db, files, key, [10])
    (item_id,) = item_ids(db, job_id)
    first = store.claim(db, item_id, owner="a", lease=LEASE, max_attempts=3)
    assert first is not None
    # A live lease: a second delivery cannot claim it.
    assert store.claim(db, item_id, owner="b", lease=LEASE, max_attempts=3) is None
    assert store.succeed(db, first, output(10)) is True
    # The same claim committed twice (a worker retrying its commit): still one charge.
    assert store.succeed(db, first, output(10)) is False
    assert store.claim(db, item_id, owner="c", lease=LEASE, max_attempts=3) is None
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(UsageEvent)) == 1
    job, _ = store.get(db, job_id, key.id)
    assert job.status == "succeeded" and job.credits_charged == 10
    assert keys.get_key(db, key.id).credits == 90
    assert ledger_mismatches(db) == []


def test_two_workers_racing_for_one_expired_lease_one_wins(db: Database, tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    key = new_key(db, 100)
    job_id = make_job(db, files, key, [10])
    (item_id,) = item_ids(db, job_id)
    dead = store.claim(db, item_id, owner="dead", lease=timedelta(seconds=0.2), max_attempts=5)
    assert dead is not None
    time.sleep(0.3)
    won: list[store.Claimed] = []
    barrier = threading.Barrier(4)

    def race(owner: str) -> None:
        barrier.wait()
        claimed = store.claim(db, item_id, owner=owner, lease=LEASE, max_attempts=5)
        if claimed is not None:
            won.append(claimed)

    threads = [threading.Thread(target=race, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].attempts == 2
    # The dead worker comes back and commits late: whichever commits first is the only charge.
    assert store.succeed(db, dead, output(10)) is True
    assert store.succeed(db, won[0], output(10)) is False
    assert keys.get_key(db, key.id).credits == 90
    assert ledger_mismatches(db) == []


def test_a_poison_item_fails_after_max_attempts_uncharged(db: Database, tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    key = new_key(db, 100)
    job_id = make_job(db, files, key, [10, 10])
    poison, healthy = item_ids(db, job_id)
    for attempt in range(1, 4):  # each claim's worker dies: the lease runs out
        claimed = store.claim(db, poison, owner=f"w{attempt}", lease=timedelta(0), max_attempts=3)
        assert claimed is not None and claimed.attempts == attempt
        time.sleep(0.01)
    assert store.claim(db, poison, owner="w4", lease=LEASE, max_attempts=3) is None
    ok = store.claim(db, healthy, owner="w4", lease=LEASE, max_attempts=3)
    assert ok is not None and store.succeed(db, ok, output(10))
    job, items = store.get(db, job_id, key.id)
    assert items[0].status == "failed" and items[0].error_code == "attempts_exhausted"
    assert job.status == "partially_failed"
    assert keys.get_key(db, key.id).credits == 90  # the poison item's hold went back
    with db.read() as s:
        assert s.scalar(select(Hold.status).where(Hold.id == items[0].hold_id)) == "released"
    assert ledger_mismatches(db) == []


def test_cancel_releases_items_not_started(db: Database, tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    key = new_key(db, 100)
    job_id = make_job(db, files, key, [10, 10, 10])
    first = item_ids(db, job_id)[0]
    running = store.claim(db, first, owner="w", lease=LEASE, max_attempts=3)
    assert running is not None
    job = store.cancel(db, job_id, key.id)
    assert job.status == "running"  # the running item still finishes
    assert keys.get_key(db, key.id).credits == 90  # 30 held, the two not started given back
    assert store.succeed(db, running, output(10)) is True
    job, items = store.get(db, job_id, key.id)
    assert job.status == "canceled"
    assert [it.status for it in items] == ["succeeded", "canceled", "canceled"]
    assert keys.get_key(db, key.id).credits == 90
    other = new_key(db, 0)
    with pytest.raises(store.NotFound):
        store.cancel(db, job_id, other.id)
    assert ledger_mismatches(db) == []
