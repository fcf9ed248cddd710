"""Redis, the rate-limit store shared by replicas, down or hung: calls are still answered and
metered, and rate limits fall back to each replica's own memory (a warning in the log) until
Redis answers again; then the counters are shared again."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.faults import PrivateRedis, private_redis, read_books, wait_for
from tests.utils import SECRETS, Server, linked_weights, start_server, stop_server

LIMIT = 3  # calls per minute of the keys whose limit a test reaches
CALL_TIMEOUT_S = 30.0  # a hung Redis must not hold a call longer than this


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def redis() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path, repo_weights: Path, redis: PrivateRedis) -> Iterator[Server]:
    weights = linked_weights(tmp_path / "weights", repo_weights, None)
    srv = start_server(
        tmp_path,
        weights,
        IMGSVC_REDIS_URL=redis.url,
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_JOBS_DIR=str(tmp_path / "jobs"),
    )
    yield srv
    stop_server(srv)


def new_key(server: Server, name: str, limit: int = LIMIT) -> tuple[str, int]:
    """(secret, id) of a key with `limit` calls per minute."""
    created = ("keys", "create", "--name", name, "--credits", "1000")
    secret = server.cli(*created, "--rate-limit", f"{limit}/minute").splitlines()[-1]
    SECRETS.add(secret)  # checked against the server logs at the end of the run
    with server.client(secret) as c:
        return secret, int(c.get("/v1/account").json()["id"])


def upscale(server: Server, secret: str) -> httpx.Response:
    with httpx.Client(
        base_url=server.url, headers={"X-API-Key": secret}, timeout=CALL_TIMEOUT_S
    ) as c:
        return c.post(
            "/v1/upscale",
            files={"image": ("s.png", tiny_png(), "image/png")},
            data={"model": "realesr-animevideov3"},
        )


def calls_until_limited(server: Server, secret: str) -> list[httpx.Response]:
    return [upscale(server, secret) for _ in range(LIMIT + 1)]


def counted_in_redis(redis: PrivateRedis, key_id: int) -> bool:
    return any(f"/key/{key_id}/" in name for name in redis.keys("LIMITS*"))


def assert_limited_and_metered(server: Server, responses: list[httpx.Response]) -> None:
    assert [r.status_code for r in responses] == [200] * LIMIT + [429], [
        r.text[:200] for r in responses
    ]
    refused = responses[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    charged = {
        r.headers["X-Request-Id"]: int(r.headers["X-Credits-Charged"]) for r in responses[:-1]
    }
    usage = read_books(server.env["IMGSVC_DATABASE_URL"]).usage
    assert {rid: usage.get(rid) for rid in charged} == charged


def test_rate_limits_fall_back_to_memory_while_redis_is_down(
    server: Server, redis: PrivateRedis
) -> None:
    shared, shared_id = new_key(server, "shared")
    assert_limited_and_metered(server, calls_until_limited(server, shared))
    assert counted_in_redis(redis, shared_id)

    redis.pause()  # Redis hangs: the call waits a bounded time, then counts in memory
    hung, _ = new_key(server, "hung")
    assert_limited_and_metered(server, calls_until_limited(server, hung))
    redis.resume()

    redis.stop()  # Redis refuses connections
    down, _ = new_key(server, "down")
    assert_limited_and_metered(server, calls_until_limited(server, down))
    assert "rate-limit store unreachable" in server.log.read_text()

    redis.start()  # on the same port: the counters are shared again after a while
    back, back_id = new_key(server, "back", limit=1000)
    wait_for(
        "rate limits counted in Redis again",
        lambda: upscale(server, back).status_code == 200 and counted_in_redis(redis, back_id),
    )
    assert "rate-limit store reachable again" in server.log.read_text()
