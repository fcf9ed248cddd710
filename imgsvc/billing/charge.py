"""One charge as a context: hold → heartbeat while the work runs → capture on success, release
on any failure. The same code charges a call answered over HTTP and an item run by a worker.

    with meter.hold(key=key, credits=10, request_id=rid, price_version=v) as charge:
        result = work()
        charged, remaining = charge.capture(credits=10, usage=usage)

`hold()` reserves at once (InsufficientCredits / MonthlyCapReached, nothing taken); leaving
the block without `capture` — an exception, a cancelled call — releases the hold. One thread
per `Meter` extends the expiry of every running hold every `ttl / 3`, so only a dead process
lets a hold expire, and then the sweeper gives its credits back.

Calls that reach the database at the same moment share its work: on PostgreSQL the holds of
one account go in one statement (its balance row is locked once per group, not once per
call), and captures go in one statement; on SQLite holds go in one transaction, and captures
in another (one wait for the disk per group). A caller returns only once its own hold or
capture is committed, and gets its own outcome, as if it had been alone.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from functools import partial
from types import TracebackType

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from imgsvc.billing import metering
from imgsvc.billing.combine import Combiner
from imgsvc.billing.db import Database
from imgsvc.billing.idempotency import Completion
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.limits import MAX_CREDITS
from imgsvc.billing.metering import CaptureRequest, HoldRequest, UsageRecord
from imgsvc.billing.schema import utcnow
from imgsvc.errors import Conflict, InsufficientCredits

log = logging.getLogger("imgsvc.billing")


class RequestIdTaken(Conflict):
    """The request id is in the ledger already (a caller's own id sent twice); nothing held."""

    code = "request_id_taken"


class Meter:
    """Holds on one database and the heartbeat that keeps the running ones alive."""

    def __init__(self, db: Database, *, hold_ttl: timedelta) -> None:
        self.db = db
        self.ttl = hold_ttl
        self._running: set[int] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shared_statement = db.dialect == "postgresql"
        self._holds = Combiner(partial(metering.reserve_many, db))
        self._captures = Combiner(partial(metering.capture_many, db))

    def hold(self, *, key: KeyInfo, credits: int, request_id: str, price_version: str) -> Charge:
        """Reserve `credits` now; the returned Charge settles it (use it as a context).
        RequestIdTaken when `request_id` was held before."""
        if credits > MAX_CREDITS:  # no balance can pay it, and no ledger column holds it
            raise InsufficientCredits(
                f"this call costs {credits} credits, more than any balance may hold "
                f"({MAX_CREDITS}); send a smaller image",
                extra={"credits_required": credits},
            )
        try:
            hold_id = self._reserve(key, credits, request_id, price_version)
        except IntegrityError:  # the only unique column of a hold is its request id
            raise RequestIdTaken(f"request id {request_id!r} was used before") from None
        with self._guard:
            self._running.add(hold_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, name="imgsvc-hold-heartbeat", daemon=True
                )
                self._thread.start()
        return Charge(self, key=key, hold_id=hold_id, request_id=request_id)

    def _reserve(self, key: KeyInfo, credits: int, request_id: str, price_version: str) -> int:
        if not self._shared_statement:  # SQLite: every hold in one transaction
            request = HoldRequest(key, credits, request_id, utcnow() + self.ttl, price_version)
            hold_id = self._holds.submit(None, request)
        elif key.monthly_cap is None:  # PostgreSQL: one account's holds in one statement
            request = HoldRequest(key, credits, request_id, utcnow() + self.ttl, price_version)
            hold_id = self._holds.submit(key.account_id, request)
        else:
            hold_id = metering.reserve(
                self.db,
                key=key,
                credits=credits,
                request_id=request_id,
                ttl=self.ttl,
                price_version=price_version,
            )
        return hold_id

    def close(self) -> None:
        """Stop the heartbeat (running holds then expire and are swept)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _capture(self, request: CaptureRequest) -> tuple[int, int]:
        return self._captures.submit(None, request)

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

    def capture(
        self, *, credits: int, usage: UsageRecord, completion: Completion | None = None
    ) -> tuple[int, int]:
        """Charge `credits` (at most the hold) and record the usage: (charged, remaining).
        With `completion`, its response is stored in the same transaction."""
        request = CaptureRequest(
            self.hold_id, credits, self.key, self.request_id, usage, completion
        )
        charged, remaining = self._meter._capture(request)
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
