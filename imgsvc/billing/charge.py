"""One charge as a context: hold → heartbeat while the work runs → capture on success, release
on any failure. The same code charges a call answered over HTTP and an item run by a worker.

    with meter.hold(key=key, credits=10, request_id=rid, price_version=v) as charge:
        result = work()
        charged, remaining = charge.capture(credits=10, usage=usage)

`hold()` reserves at once (InsufficientCredits / MonthlyCapReached, nothing taken); leaving
the block without `capture` — an exception, a cancelled call — releases the hold. One thread
per `Meter` extends the expiry of every running hold every `ttl / 3`, so only a dead process
lets a hold expire, and then the sweeper gives its credits back.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError

from imgsvc.billing import metering
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord

log = logging.getLogger("imgsvc.billing")


class Meter:
    """Holds on one database and the heartbeat that keeps the running ones alive."""

    def __init__(self, db: Database, *, hold_ttl: timedelta) -> None:
        self.db = db
        self.ttl = hold_ttl
        self._running: set[int] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, *, key: KeyInfo, credits: int, request_id: str, price_version: str) -> Charge:
        """Reserve `credits` now; the returned Charge settles it (use it as a context)."""
        hold_id = metering.reserve(
            self.db,
            key=key,
            credits=credits,
            request_id=request_id,
            ttl=self.ttl,
            price_version=price_version,
        )
        with self._guard:
            self._running.add(hold_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, name="imgsvc-hold-heartbeat", daemon=True
                )
                self._thread.start()
        return Charge(self, key=key, hold_id=hold_id, request_id=request_id)

    def close(self) -> None:
        """Stop the heartbeat (running holds then expire and are swept)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _done(self, hold_id: int) -> None:
        with self._guard:
            self._running.discard(hold_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl.total_seconds() / 3):
            with self._guard:
                running = sorted(self._running)
            if not running:
                continue
            try:
                metering.extend(self.db, hold_ids=running, ttl=self.ttl)
            except SQLAlchemyError:
                log.exception("hold heartbeat failed; retrying in %s s", self.ttl / 3)


class Charge:
    """One hold, settled exactly once: `capture` on success, else released on exit."""

    def __init__(self, meter: Meter, *, key: KeyInfo, hold_id: int, request_id: str) -> None:
        self._meter = meter
        self.key = key
        self.hold_id = hold_id
        self.request_id = request_id
        self.settled = False

    def capture(self, *, credits: int, usage: UsageRecord) -> tuple[int, int]:
        """Charge `credits` (at most the hold) and record the usage: (charged, remaining)."""
        charged, remaining = metering.capture(
            self._meter.db,
            hold_id=self.hold_id,
            credits=credits,
            key=self.key,
            request_id=self.request_id,
            usage=usage,
        )
        self._settle()
        return charged, remaining

    def release(self) -> None:
        """Give the whole hold back (a no-op once settled)."""
        if not self.settled:
            metering.release(self._meter.db, hold_id=self.hold_id)
            self._settle()

    def _settle(self) -> None:
        self.settled = True
        self._meter._done(self.hold_id)

    def __enter__(self) -> Charge:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.settled:
            try:
                self.release()
            except SQLAlchemyError:
                # The hold stays until it expires; the sweeper releases it then.
                log.exception("request %s: release failed; left to the sweeper", self.request_id)
                self._meter._done(self.hold_id)
