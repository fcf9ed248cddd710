"""Run one job item: claim its lease → `prepare` → the device slot → `run` → write the output →
record it with its charge (one transaction). The in-process pool and the Celery worker both
call `ItemRunner.run`, so both behave alike; neither knows HTTP.

Outcomes: `succeeded`; `failed` (the input or its options are bad, or the job folder has no
room for the output: the hold is released, no retry); `retry` (an unexpected error: the lease
is given back and another attempt made, up to the attempt limit); `skipped` (not claimable:
finished, canceled or leased by a live worker — what a broker's duplicate delivery gets);
`duplicate` (run, but another delivery committed first: its output is deleted and nothing is
charged).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from imgsvc import metrics
from imgsvc.billing.db import Database
from imgsvc.errors import ServiceError
from imgsvc.images import MEDIA_TYPES
from imgsvc.jobs import store
from imgsvc.jobs.files import JobFiles, StorageFull
from imgsvc.operations.catalog import operation_kind
from imgsvc.operations.context import Context
from imgsvc.operations.execute import run_admitted

log = logging.getLogger("imgsvc.jobs")
Outcome = Literal["succeeded", "failed", "retry", "skipped", "duplicate"]
_EXT = {media: f".{fmt}" for fmt, media in MEDIA_TYPES.items()} | {"application/zip": ".zip"}


def worker_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class ItemRunner:
    """Runs items of the job store in this process; one lease heartbeat for all of them."""

    def __init__(
        self,
        db: Database,
        ctx: Context,
        files: JobFiles,
        *,
        lease: timedelta,
        max_attempts: int,
        name: str = "worker",
    ) -> None:
        self.db, self.ctx, self.files = db, ctx, files
        self.lease, self.max_attempts = lease, max_attempts
        self.name = name
        self._running: dict[int, str] = {}  # item id → lease owner
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def run(self, item_id: int) -> Outcome:
        owner = worker_name(self.name)
        claimed = store.claim(
            self.db, item_id, owner=owner, lease=self.lease, max_attempts=self.max_attempts
        )
        if claimed is None:
            return metrics.count_job_item("skipped")
        if claimed.attempts > 1:
            metrics.JOB_ITEMS_REDELIVERED.inc()
        self._track(claimed.id, owner)
        try:
            return metrics.count_job_item(self._run_claimed(claimed))
        finally:
            with self._guard:
                self._running.pop(claimed.id, None)

    def _run_claimed(self, claimed: store.Claimed) -> Outcome:
        kind = operation_kind(claimed.operation)
        try:
            options = kind.parse(claimed.options)
            data = self.files.read(claimed.job_id, claimed.input_path)
            shared = self.files.shared(claimed.job_id)
            prepared = kind.prepare(options, data, shared, self.ctx)
            with self.ctx.registry.admission.admit(prepared.operation) as ticket:
                result, duration_ms = run_admitted(prepared, ticket)
        except ServiceError as exc:
            if exc.code == "queue_full":  # the device is busy with synchronous calls: later
                store.release_lease(self.db, claimed)
                return "retry"
            store.fail(self.db, claimed, exc)
            return "failed"
        except Exception:
            log.exception("item %s.%d failed unexpectedly", claimed.job_id, claimed.item)
            if claimed.attempts >= self.max_attempts:
                store.fail(
                    self.db,
                    claimed,
                    ServiceError(f"internal error after {claimed.attempts} attempts; not charged"),
                )
                return "failed"
            store.release_lease(self.db, claimed)
            return "retry"
        ext = _EXT.get(result.media_type, "")
        try:
            path = self.files.write_output(claimed.job_id, claimed.item, ext, result.body)
        except StorageFull as exc:  # the folder is full: fail now, uncharged, not run again
            log.warning("item %s.%d: %s", claimed.job_id, claimed.item, exc.message)
            store.fail(self.db, claimed, exc)
            return "failed"
        credits = prepared.credits if result.credits is None else result.credits
        out = store.Output(
            path=path,
            ext=ext,
            media_type=result.media_type,
            model=result.model,
            model_version=result.model_version,
            input_size=result.input_size,
            output_size=result.output_size,
            credits=credits,
            price_version=prepared.price_version,
            duration_ms=duration_ms,
        )
        try:
            committed = store.succeed(self.db, claimed, out)
        except BaseException:
            self.files.remove(claimed.job_id, path)
            raise
        if not committed:
            self.files.remove(claimed.job_id, path)
            return "duplicate"
        return "succeeded"

    def close(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)

    def _track(self, item_id: int, owner: str) -> None:
        with self._guard:
            self._running[item_id] = owner
            if self._beat_thread is None:
                self._beat_thread = threading.Thread(
                    target=self._beat, name="imgsvc-lease-heartbeat", daemon=True
                )
                self._beat_thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.total_seconds() / 3):
            with self._guard:
                running = dict(self._running)
            by_owner: dict[str, list[int]] = {}
            for item_id, owner in running.items():
                by_owner.setdefault(owner, []).append(item_id)
            for owner, ids in by_owner.items():
                try:
                    store.extend_leases(self.db, ids, owner=owner, lease=self.lease)
                except SQLAlchemyError:
                    log.exception("lease heartbeat failed; retrying")
