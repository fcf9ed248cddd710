"""Idempotency-Key: the first response for (key, Idempotency-Key) is stored for 24 hours and
replayed to retries, so a retry never runs (or charges) twice.

A request claims its (key, Idempotency-Key) first. A charged call stores its response in the
transaction of its capture (`Completion`, done by `metering`), so a call is charged exactly
when its response is stored: a crash can lose neither one without the other. A claim of a call
in flight is a lease that this process's heartbeat keeps alive (`Claims`): when the process
dies before the capture, nothing was charged and the key can be used again once the lease has
run out (the hold expiry, `IMGSVC_HOLD_TTL_SECONDS`).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, Connection, delete, select, tuple_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from imgsvc.billing.db import Database
from imgsvc.billing.schema import IdempotencyRecord, utcnow
from imgsvc.errors import Conflict, InvalidInput

log = logging.getLogger(__name__)

RETENTION = timedelta(hours=24)
MAX_KEY_LENGTH = 255


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    media_type: str


@dataclass(frozen=True)
class Claim:
    """This request's hold on (key, Idempotency-Key): `token` tells it from a later claim."""

    key_id: int
    idem_key: str
    token: str


@dataclass(frozen=True)
class Completion:
    """What a charged call stores in its capture's transaction: `render(charged, remaining)`
    gives the response that is stored under `claim` and replayed to retries."""

    claim: Claim
    render: Callable[[int, int], StoredResponse]


def begin(
    db: Database,
    *,
    key_id: int,
    idem_key: str,
    fingerprint: str,
    lease: timedelta = RETENTION,
) -> Claim | StoredResponse:
    """Claim (key, idem_key) for this request for `lease`: a Claim = go ahead and run it; a
    StoredResponse = replay it; raises 409 while the first call is still running, 422 for a
    different request. A claim whose lease has run out is taken over."""
    if not idem_key or len(idem_key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
    now = utcnow()
    claim = Claim(key_id, idem_key, secrets.token_hex(16))
    try:
        with db.transaction() as s:
            s.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.key_id == key_id,
                    IdempotencyRecord.idem_key == idem_key,
                    IdempotencyRecord.expires_at < now,
                )
            )
            s.add(
                IdempotencyRecord(
                    key_id=key_id,
                    idem_key=idem_key,
                    fingerprint=fingerprint,
                    status="running",
                    claim=claim.token,
                    expires_at=now + lease,
                )
            )
        return claim
    except IntegrityError:
        pass  # someone holds this key already: see what they did
    with db.transaction() as s:
        record = s.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.key_id == key_id, IdempotencyRecord.idem_key == idem_key
            )
        ).one_or_none()
    if record is None:  # finished and aborted between our two statements: let the client retry
        raise IdempotencyInProgress("a request with this Idempotency-Key just ended; retry")
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different request; use a new key"
        )
    if record.status != "done" or record.response_body is None:
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still running; retry later",
            retry_after_s=1,
        )
    return StoredResponse(
        status=int(record.response_status or 200),
        headers=json.loads(record.response_headers or "{}"),
        body=record.response_body,
        media_type=record.media_type or "application/octet-stream",
    )


def complete(db: Database, claim: Claim, response: StoredResponse) -> None:
    """Store `response` for replays (an uncharged answer, such as a new job's)."""
    with db.connection() as conn:
        _store(conn, claim, response)


def complete_in(conn: Connection, completion: Completion, charged: int, remaining: int) -> None:
    """Store a charged call's response in the transaction of its capture; raises
    IdempotencyInProgress (and so fails the capture) when the claim was taken over."""
    _store(conn, completion.claim, completion.render(charged, remaining))


def _store(conn: Connection, claim: Claim, response: StoredResponse) -> None:
    stored = conn.execute(
        update(IdempotencyRecord)
        .where(*_mine(claim), IdempotencyRecord.status == "running")
        .values(
            status="done",
            response_status=response.status,
            response_headers=json.dumps(response.headers),
            response_body=response.body,
            media_type=response.media_type,
            expires_at=utcnow() + RETENTION,
        )
    )
    if stored.rowcount != 1:
        raise IdempotencyInProgress(
            "another request with this Idempotency-Key took over; retry to get its answer",
            retry_after_s=1,
        )


def abort(db: Database, claim: Claim) -> None:
    """Forget a claim whose call failed, so the client may retry it."""
    with db.transaction() as s:
        s.execute(
            delete(IdempotencyRecord).where(*_mine(claim), IdempotencyRecord.status == "running")
        )


def _mine(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (
        IdempotencyRecord.key_id == claim.key_id,
        IdempotencyRecord.idem_key == claim.idem_key,
        IdempotencyRecord.claim == claim.token,
    )


def purge_expired(db: Database) -> int:
    with db.transaction() as s:
        res = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at < utcnow()))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


class Claims:
    """The claims of this process's calls in flight, each a lease of `lease` renewed by a
    heartbeat every third of it until the call ends (`done`)."""

    def __init__(self, db: Database, *, lease: timedelta) -> None:
        self.db, self.lease = db, lease
        self._running: set[Claim] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, *, key_id: int, idem_key: str, fingerprint: str) -> Claim | StoredResponse:
        outcome = begin(
            self.db, key_id=key_id, idem_key=idem_key, fingerprint=fingerprint, lease=self.lease
        )
        if isinstance(outcome, Claim):
            with self._guard:
                self._running.add(outcome)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._beat, name="imgsvc-idempotency-heartbeat", daemon=True
                    )
                    self._thread.start()
        return outcome

    def abort(self, claim: Claim) -> None:
        try:
            abort(self.db, claim)
        finally:
            self.done(claim)

    def done(self, claim: Claim) -> None:
        """Stop renewing `claim` (its call has stored its response or given up)."""
        with self._guard:
            self._running.discard(claim)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.total_seconds() / 3):
            with self._guard:
                running = list(self._running)
            if not running:
                continue
            try:
                self._renew(running)
            except SQLAlchemyError:
                log.exception("idempotency heartbeat failed; retrying in %s", self.lease / 3)

    def _renew(self, claims: list[Claim]) -> None:
        keys = [(c.key_id, c.idem_key) for c in claims]
        tokens = [c.token for c in claims]
        with self.db.transaction() as s:
            s.execute(
                update(IdempotencyRecord)
                .where(
                    tuple_(IdempotencyRecord.key_id, IdempotencyRecord.idem_key).in_(keys),
                    IdempotencyRecord.claim.in_(tokens),
                    IdempotencyRecord.status == "running",
                )
                .values(expires_at=utcnow() + self.lease)
            )
