"""Rate limits in memory and shared through the real Redis on localhost; the key cache."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from imgsvc.billing import keys
from imgsvc.billing.db import Database
from imgsvc.billing.ratelimit import RateLimited, RateLimiter
from imgsvc.errors import Unauthorized
from imgsvc.routes.errors import error_headers

REDIS_URL = os.environ.get("IMGSVC_TEST_REDIS", "redis://127.0.0.1:6379/0")


def test_memory_limit_counts_per_key() -> None:
    limiter = RateLimiter("2/minute")
    assert limiter.check(1, None).remaining == 1
    assert limiter.check(1, None).remaining == 0
    with pytest.raises(RateLimited) as refused:
        limiter.check(1, None)
    headers = error_headers(refused.value)
    assert headers["RateLimit-Policy"] == '"default";q=2;w=60'
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert limiter.check(2, None).remaining == 1  # another key is unaffected
    assert limiter.check(1, "5/minute").limit == 5  # a key's own limit is a separate budget


def test_redis_limit_is_shared_by_replicas() -> None:
    key_id = secrets.randbelow(10**12) + 10**12  # unique in the shared Redis
    replica_a = RateLimiter("3/minute", REDIS_URL)
    replica_b = RateLimiter("3/minute", REDIS_URL)
    replica_a.check(key_id, None)
    replica_b.check(key_id, None)
    assert replica_a.check(key_id, None).remaining == 0
    with pytest.raises(RateLimited):
        replica_b.check(key_id, None)


def test_key_cache_sees_revocation_within_ttl(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    info, secret = keys.create_key(db, name="c", credits=1)
    cache = keys.KeyCache(db, ttl=0.5)
    assert cache.authenticate(secret).id == info.id
    keys.revoke_key(db, info.id)
    assert cache.authenticate(secret).id == info.id  # still cached
    time.sleep(0.6)
    with pytest.raises(Unauthorized):
        cache.authenticate(secret)
    with pytest.raises(Unauthorized):
        cache.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
