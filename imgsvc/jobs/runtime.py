"""The jobs machinery of one API process: the job folder, who runs items (the in-process pool,
or Celery workers when a broker is set), and the upkeep loop (re-queue lost items, expire old
results, deliver webhooks)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from imgsvc.billing.db import Database
from imgsvc.config import Settings
from imgsvc.fetch import FetchPolicy
from imgsvc.jobs import notify, sweeper
from imgsvc.jobs.files import JobFiles
from imgsvc.jobs.fleet import CeleryDispatcher, make_celery
from imgsvc.jobs.pool import LocalPool
from imgsvc.jobs.runner import ItemRunner
from imgsvc.jobs.sweeper import Dispatcher
from imgsvc.operations.context import Context

log = logging.getLogger("imgsvc.jobs")
WEBHOOK_POLL_S = 1.0
WEBHOOK_MAX_BYTES = 64 * 1024


def runner_from_settings(settings: Settings, db: Database, ctx: Context, name: str) -> ItemRunner:
    return ItemRunner(
        db,
        ctx,
        JobFiles(settings.jobs_dir),
        lease=timedelta(seconds=settings.job_lease_seconds),
        max_attempts=settings.job_max_attempts,
        name=name,
    )


class Upkeep:
    """A thread that re-queues lost items, expires old results and (optionally) delivers
    webhooks; used by the API process and by every worker."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        dispatcher: Dispatcher,
        *,
        webhook_policy: FetchPolicy | None,
    ) -> None:
        self.settings, self.db, self.dispatcher = settings, db, dispatcher
        self.files = JobFiles(settings.jobs_dir)
        self.webhook_policy = webhook_policy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgsvc-jobs-upkeep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sweep(self) -> None:
        sweeper.redispatch(
            self.db,
            self.dispatcher,
            stale_after=timedelta(seconds=self.settings.job_redispatch_seconds),
        )
        sweeper.expire(self.db, self.files)

    def _loop(self) -> None:
        last_sweep = 0.0
        interval = self.settings.job_sweep_seconds
        while not self._stop.wait(min(WEBHOOK_POLL_S, interval)):
            try:
                if time.monotonic() - last_sweep >= interval:
                    last_sweep = time.monotonic()
                    self.sweep()
                if self.webhook_policy is not None:
                    notify.deliver_due(self.db, self.webhook_policy, self.settings.webhook_schedule)
            except SQLAlchemyError:
                log.exception("job upkeep failed; retrying")
            except Exception:
                log.exception("job upkeep error; retrying")


class JobsRuntime:
    """What the API needs to accept jobs: files, a dispatcher, the pool when there is no broker."""

    def __init__(self, settings: Settings, db: Database, ctx: Context) -> None:
        self.settings = settings
        self.files = JobFiles(settings.jobs_dir)
        self.pool: LocalPool | None = None
        self.celery: CeleryDispatcher | None = None
        if settings.broker_url:
            self.celery = CeleryDispatcher(
                make_celery(settings.broker_url, item_timeout_s=settings.job_item_timeout_seconds)
            )
            self.dispatcher: Dispatcher = self.celery
        else:
            runner = runner_from_settings(settings, db, ctx, "api")
            self.pool = LocalPool(runner, threads=settings.job_workers, poll_s=1.0)
            self.dispatcher = self.pool
        self.upkeep = Upkeep(
            settings,
            db,
            self.dispatcher,
            webhook_policy=FetchPolicy(
                max_bytes=WEBHOOK_MAX_BYTES,
                timeout_s=settings.webhook_timeout_s,
                allow=ctx.fetch.allow,
            ),
        )

    def start(self) -> None:
        if self.pool is not None and self.settings.job_workers > 0:
            self.pool.start()
        self.upkeep.start()

    def close(self) -> None:
        self.upkeep.close()
        if self.pool is not None:
            self.pool.close()
        if self.celery is not None:
            self.celery.close()
