"""How long to wait before trying a call again: the service's `Retry-After` (capped), else
exponential backoff, both with a little jitter, for at most `max_attempts` attempts."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime

# Answers that say "not now" rather than "no".
RETRY_STATUSES = frozenset({429, 503})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts the first attempt: 1 means no retry at all."""

    max_attempts: int = 5
    max_retry_after: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait after attempt number `attempt` (0-based) failed; None when that
        was the last one allowed."""
        if attempt + 1 >= self.max_attempts:
            return None
        if retry_after is not None:
            # Never earlier than the service asked (unless over the cap), a little later at random
            # so that many clients told the same thing do not come back at the same instant.
            wait = min(retry_after, self.max_retry_after)
            return wait + random.uniform(0.0, 0.1 * wait + 0.05)
        backoff = min(self.backoff_max, self.backoff_base * 2**attempt)
        return random.uniform(backoff / 2, backoff)
