"""Per-key rate limits with the `limits` library: in memory on one machine, Redis when
IMGSVC_REDIS_URL is set (shared by every replica).

A Redis that cannot be reached (refused, or no answer within `SHARED_TIMEOUT_S`) never fails a
call: the limiter counts in this process's memory instead, with a warning in the log, and tries
Redis again every `SHARED_RETRY_S`. Meanwhile each replica enforces the limit on its own."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import Storage as AsyncStorage
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from imgsvc.errors import ServiceError

log = logging.getLogger("imgsvc.billing")
SHARED_TIMEOUT_S = 1.0  # a Redis command that takes longer counts as Redis being down
SHARED_RETRY_S = 5.0  # while Redis is down, how often a call tries it again


@dataclass(frozen=True)
class RateState:
    """Where a key stands in its current window (what the RateLimit headers report)."""

    limit: int
    remaining: int
    reset_seconds: int
    window_seconds: int


class RateLimited(ServiceError):
    code = "rate_limited"

    def __init__(self, message: str, *, state: RateState) -> None:
        super().__init__(message, retry_after_s=max(1, state.reset_seconds))
        self.state = state


class RateLimiter:
    """One limiter per process; `check` counts a call for a key or raises RateLimited (429)."""

    def __init__(self, default_limit: str, redis_url: str | None = None) -> None:
        self.shared = redis_url is not None  # network I/O: callers run check() in a thread
        self._local_storage = storage_from_string("memory://")
        self._local = FixedWindowRateLimiter(self._local_storage)
        self._shared_storage: Storage | AsyncStorage | None = None
        self._shared: FixedWindowRateLimiter | None = None
        if redis_url is not None:
            shared = storage_from_string(
                redis_url,
                wrap_exceptions=True,
                socket_timeout=SHARED_TIMEOUT_S,
                socket_connect_timeout=SHARED_TIMEOUT_S,
            )
            self._shared_storage = shared
            self._shared = FixedWindowRateLimiter(shared)
        self._shared_down_until: float | None = None  # monotonic time of the next try
        self._state_lock = threading.Lock()
        self._default = parse(default_limit)
        self._parsed: dict[str, RateLimitItem] = {}

    def _item(self, limit: str | None) -> RateLimitItem:
        if limit is None:
            return self._default
        if limit not in self._parsed:
            self._parsed[limit] = parse(limit)
        return self._parsed[limit]

    def check(self, key_id: int, limit: str | None) -> RateState:
        item = self._item(limit)
        if self._shared is not None and self._shared_due():
            try:
                return self._count(self._shared, item, key_id)
            except StorageError as exc:
                self._shared_failed(exc)
        return self._count(self._local, item, key_id)

    def _shared_due(self) -> bool:
        down_until = self._shared_down_until
        return down_until is None or time.monotonic() >= down_until

    def _shared_failed(self, exc: StorageError) -> None:
        with self._state_lock:
            first = self._shared_down_until is None
            self._shared_down_until = time.monotonic() + SHARED_RETRY_S
        if first:
            log.warning(
                "rate-limit store unreachable (%s); counting in this process until it answers",
                type(exc.storage_error).__name__,
            )

    def _count(
        self, limiter: FixedWindowRateLimiter, item: RateLimitItem, key_id: int
    ) -> RateState:
        allowed = limiter.hit(item, "key", str(key_id))
        if limiter is self._shared and self._shared_down_until is not None:
            with self._state_lock:
                back, self._shared_down_until = self._shared_down_until is not None, None
            if back:
                log.warning("rate-limit store reachable again; limits are shared again")
        stats = limiter.get_window_stats(item, "key", str(key_id))
        state = RateState(
            limit=item.amount,
            remaining=max(0, stats.remaining),
            reset_seconds=max(0, math.ceil(stats.reset_time - time.time())),
            window_seconds=item.get_expiry(),
        )
        if not allowed:
            raise RateLimited(
                f"rate limit of {item.amount} calls per {item.get_expiry()} s reached; "
                f"retry in {state.reset_seconds} s",
                state=state,
            )
        return state

    def reset(self) -> None:
        self._local_storage.reset()
        if self._shared_storage is not None:
            self._shared_storage.reset()
