"""A job's completion notice to the caller's `webhook_url`, in the Standard Webhooks format.

Each attempt is one POST through `imgsvc.fetch.post` (the address rules of an image fetch, no
redirects followed, a deadline) with the headers `webhook-id` (the same on every attempt of one
message), `webhook-timestamp` (unix seconds, fresh on each attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` under the secret's decoded bytes), so any
Standard Webhooks library verifies it (https://www.standardwebhooks.com). An attempt never
raises: `Attempt.retry` says whether to try again and `retry_delay` when.
"""

from __future__ import annotations

import base64
import logging
import math
import random
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from imgsvc.fetch import FetchPolicy, UrlFetchFailed, UrlNotAllowed, post

log = logging.getLogger("imgsvc.jobs")

SECRET_PREFIX = "whsec_"
DEFAULT_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000)
"""Delays before the 2nd … 7th attempt (5 s, 5 min, 30 min, 2 h, 5 h, 10 h), Svix-style."""
JITTER = 0.2
_MSG_ID = re.compile(r"[!-~]{1,256}")  # visible ASCII: it travels as a header value
_RNG = random.Random()


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def signed_headers(secret: str, msg_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The headers of one attempt; a naive `timestamp` is taken as UTC.

    ValueError when the secret is not a `whsec_` base64 secret, the id is not 1-256 visible
    ASCII characters, or the body is not UTF-8 (the signature covers the body as text).
    """
    if not _MSG_ID.fullmatch(msg_id):
        raise ValueError("the webhook message id must be 1-256 visible ASCII characters")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the webhook body is not UTF-8") from None
    try:
        webhook = Webhook(secret)
    except (ValueError, EmptyWebhookSecretError):
        raise ValueError("the webhook secret is not a whsec_ base64 secret") from None
    when = timestamp.replace(tzinfo=UTC) if timestamp.tzinfo is None else timestamp.astimezone(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(math.floor(when.timestamp())),
        "webhook-signature": webhook.sign(msg_id, when, text),
        "content-type": "application/json",
        "user-agent": "imgsvc-webhooks",
    }


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt."""

    status_code: int | None  # None when no HTTP answer came (timeout, refused connection)
    error: str | None  # short reason when status_code is None or not 2xx
    retry: bool  # whether another attempt should be made
    delivered: bool  # a 2xx answer


def attempt_delivery(
    url: str,
    secret: str,
    msg_id: str,
    body: bytes,
    policy: FetchPolicy,
    *,
    now: datetime | None = None,
) -> Attempt:
    """One signed POST of `body` to `url`, timestamped `now` (default: the current time)."""
    try:
        headers = signed_headers(secret, msg_id, now or datetime.now(UTC), body)
    except ValueError as exc:
        return Attempt(None, str(exc), retry=False, delivered=False)
    try:
        status = post(url, body, headers, policy, what="webhook_url")
    except UrlNotAllowed as exc:
        return Attempt(None, f"not allowed: {exc.message}", retry=False, delivered=False)
    except UrlFetchFailed as exc:
        return Attempt(None, exc.message, retry=True, delivered=False)
    except Exception as exc:  # an attempt never raises; the schedule bounds the retries
        log.exception("webhook delivery %s failed unexpectedly", msg_id)
        return Attempt(None, f"delivery failed ({type(exc).__name__})", retry=True, delivered=False)
    return _classify(status)


def _classify(status: int) -> Attempt:
    """What an HTTP answer means for the delivery."""
    if 200 <= status <= 299:
        return Attempt(status, None, retry=False, delivered=True)
    if status == 410:
        return Attempt(status, "HTTP 410 Gone: the receiver wants no more", False, False)
    if 300 <= status <= 399:
        return Attempt(status, f"HTTP {status}: redirects are not followed", False, False)
    retry = status in (408, 429) or 500 <= status <= 599
    return Attempt(status, f"HTTP {status}", retry=retry, delivered=False)


def retry_delay(
    attempt: int, schedule: Sequence[float], rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before the next attempt when `attempt` attempts (from 1) have been made.

    `schedule[attempt - 1]` within ±20 % jitter, so failed deliveries do not return in step; None
    once the schedule is spent.
    """
    if attempt < 1:
        raise ValueError("attempt counts the attempts made, from 1")
    if attempt > len(schedule):
        return None
    return float(schedule[attempt - 1]) * (rng or _RNG).uniform(1 - JITTER, 1 + JITTER)
