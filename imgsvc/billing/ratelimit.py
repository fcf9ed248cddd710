"""Per-key rate limits with the `limits` library: in memory on one machine, Redis when
IMGSVC_REDIS_URL is set (shared by every replica)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from imgsvc.errors import ServiceError


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
        uri = redis_url or "memory://"
        self.shared = redis_url is not None  # network I/O: callers run check() in a thread
        self._storage = storage_from_string(uri)
        self._limiter = FixedWindowRateLimiter(self._storage)
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
        allowed = self._limiter.hit(item, "key", str(key_id))
        stats = self._limiter.get_window_stats(item, "key", str(key_id))
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
        self._storage.reset()
