"""Money over real HTTP on SQLite and PostgreSQL: concurrency, idempotency, killed processes,
rate limits, sub-keys, the admin API and quotes."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imgsvc.billing import keys, metering
from imgsvc.billing.db import Database
from tests.utils import Server, linked_weights, start_server, stop_server

ADMIN_TOKEN = "test-admin-token-" + "x" * 16


def tiny_png(color: str = "gray") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, "PNG")
    return buf.getvalue()


def mask_png() -> bytes:
    m = Image.new("L", (16, 12), 0)
    m.paste(255, (4, 4, 8, 8))
    buf = io.BytesIO()
    m.save(buf, "PNG")
    return buf.getvalue()


ERASE_FILES = {
    "image": ("i.png", tiny_png(), "image/png"),
    "mask": ("m.png", mask_png(), "image/png"),
}
ERASE_PRICE = 10


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def billing_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A real server without model preloading (erase needs no weights) on either database."""
    tmp = tmp_path_factory.mktemp(f"billing-{request.param}")
    env = {
        "IMGSVC_PRELOAD_MODELS": "false",
        "IMGSVC_DEFAULT_RATE_LIMIT": "100000/minute",
        "IMGSVC_ADMIN_TOKEN": ADMIN_TOKEN,
        "IMGSVC_INPAINT_QUEUE_DEPTH": "1000",  # let every concurrent call reach billing
    }
    if request.param == "postgresql":
        env["IMGSVC_DATABASE_URL"] = request.getfixturevalue("new_postgres_db")()
    srv = start_server(tmp, tmp / "weights", **env)
    yield srv
    stop_server(srv)


def balance(server: Server, key: str) -> int:
    with server.client(key) as c:
        return int(c.get("/v1/account").json()["credits"])


async def _burst(server: Server, key: str, n: int, headers: dict[str, str]) -> list[int]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

        async def one() -> int:
            r = await client.post(
                "/v1/inpaint",
                files=ERASE_FILES,
                headers={"Authorization": f"Bearer {key}", **headers},
            )
            return r.status_code

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_100_concurrent_calls_with_credits_for_50(billing_server: Server) -> None:
    key = billing_server.new_key(50 * ERASE_PRICE)
    codes = asyncio.run(_burst(billing_server, key, 100, {}))
    assert codes.count(200) == 50 and codes.count(402) == 50, codes
    assert balance(billing_server, key) == 0
    with billing_server.client(key) as c:
        rows = c.get("/v1/usage", params={"limit": 1000}).json()["data"]
    assert len(rows) == 50 and {r["credits"] for r in rows} == {ERASE_PRICE}
    assert "ledger ok" in billing_server.cli("billing", "verify")


def test_50_concurrent_retries_share_one_idempotency_key(billing_server: Server) -> None:
    key = billing_server.new_key(10 * ERASE_PRICE)
    codes = asyncio.run(_burst(billing_server, key, 50, {"Idempotency-Key": "order-42"}))
    assert set(codes) <= {200, 409}, codes
    assert balance(billing_server, key) == 9 * ERASE_PRICE  # one execution, one charge
    with billing_server.client(key) as c:
        replay = c.post("/v1/inpaint", files=ERASE_FILES, headers={"Idempotency-Key": "order-42"})
        assert replay.status_code == 200
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.headers["X-Credits-Charged"] == str(ERASE_PRICE)
        other = {"image": ("i.png", tiny_png("red"), "image/png"), "mask": ERASE_FILES["mask"]}
        r = c.post("/v1/inpaint", files=other, headers={"Idempotency-Key": "order-42"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
        assert len(c.get("/v1/usage").json()["data"]) == 1
    assert balance(billing_server, key) == 9 * ERASE_PRICE


def test_rate_limited_key_does_not_affect_another(billing_server: Server) -> None:
    with httpx.Client(
        base_url=billing_server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        made = admin.post(
            "/v1/admin/keys", json={"name": "slow", "credits": 100, "rate_limit": "3/minute"}
        )
        assert made.status_code == 201, made.text
    limited = made.json()["key"]
    other = billing_server.new_key(100)
    with billing_server.client(limited) as c:
        for remaining in (2, 1, 0):
            r = c.post("/v1/inpaint", files=ERASE_FILES)
            assert r.status_code == 200
            assert r.headers["RateLimit-Policy"] == '"default";q=3;w=60'
            assert r.headers["RateLimit"].startswith(f'"default";r={remaining};t=')
        r = c.post("/v1/inpaint", files=ERASE_FILES)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.headers["RateLimit"].startswith('"default";r=0;')
    with billing_server.client(other) as c:
        assert c.post("/v1/inpaint", files=ERASE_FILES).status_code == 200
    assert balance(billing_server, limited) == 100 - 3 * ERASE_PRICE


def test_scopes_sub_keys_and_client_ref_export(billing_server: Server) -> None:
    reseller = billing_server.cli(
        "keys", "create", "--name", "agency", "--credits", "100", "--reseller"
    ).splitlines()[-1]
    with billing_server.client(reseller) as c:
        made = c.post("/v1/keys", json={"name": "client-a", "monthly_cap": 2 * ERASE_PRICE})
        assert made.status_code == 201, made.text
        child, child_id = made.json()["key"], made.json()["info"]["id"]
    with billing_server.client(child) as c:
        for ref in ("inv-1", "inv-2"):
            r = c.post("/v1/inpaint", files=ERASE_FILES, headers={"X-Client-Ref": ref})
            assert r.status_code == 200, r.text
        r = c.post("/v1/inpaint", files=ERASE_FILES)
        assert r.status_code == 402 and r.json()["error"]["code"] == "monthly_cap_reached"
        assert c.post("/v1/keys", json={"name": "x"}).status_code == 403
    with billing_server.client(reseller) as c:
        assert c.get("/v1/account").json()["credits"] == 100 - 2 * ERASE_PRICE
        listed = c.get("/v1/keys").json()
        assert [(k["id"], k["month_spent"]) for k in listed] == [(child_id, 2 * ERASE_PRICE)]
        csv_text = c.get(f"/v1/keys/{child_id}/usage", params={"format": "csv"}).text
        lines = csv_text.strip().splitlines()
        assert len(lines) == 3 and {ln.split(",")[4] for ln in lines[1:]} == {"inv-1", "inv-2"}
        summary = c.get("/v1/usage/summary", params={"group_by": "client_ref"}).json()
        assert summary["total_credits"] == 2 * ERASE_PRICE
        assert c.delete(f"/v1/keys/{child_id}").status_code == 200
    with billing_server.client(child) as c:
        assert c.get("/v1/account").status_code == 401
    upscale_only = billing_server.cli(
        "keys", "create", "--name", "u", "--credits", "50", "--scopes", "upscale"
    ).splitlines()[-1]
    with billing_server.client(upscale_only) as c:
        r = c.post("/v1/inpaint", files=ERASE_FILES)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert balance(billing_server, upscale_only) == 50


def test_admin_api_guarded_and_working(billing_server: Server) -> None:
    with httpx.Client(base_url=billing_server.url) as anon:
        assert anon.get("/v1/admin/keys").status_code == 401
        bad = anon.get("/v1/admin/keys", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
    with httpx.Client(
        base_url=billing_server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        made = admin.post("/v1/admin/keys", json={"name": "acme", "credits": 5}).json()
        key_id, secret = made["info"]["id"], made["key"]
        assert (
            admin.post(f"/v1/admin/keys/{key_id}/topup", json={"credits": 20}).json()["credits"]
            == 25
        )
        rotated = admin.post(f"/v1/admin/keys/{key_id}/rotate", json={"old_valid_for_seconds": 0})
        new_secret = rotated.json()["key"]
        assert balance(billing_server, new_secret) == 25
        with billing_server.client(secret) as c:
            assert c.get("/v1/account").status_code == 401
        new_id = rotated.json()["info"]["id"]
        assert admin.post(f"/v1/admin/keys/{new_id}/revoke").json()["revoked_at"]
        with billing_server.client(new_secret) as c:
            assert c.get("/v1/account").status_code == 401
        assert admin.get("/v1/admin/usage/summary").status_code == 200


def test_quote_and_402_body(billing_server: Server) -> None:
    key = billing_server.new_key(3)
    with billing_server.client(key) as c:
        q = c.post("/v1/quote", json={"operation": "upscale", "width": 500, "height": 400})
        assert q.json()["credits"] == 32 and q.json()["output_width"] == 2000
        r = c.post("/v1/inpaint", files=ERASE_FILES)
        assert r.status_code == 402
        err = r.json()["error"]
        assert err["credits_required"] == ERASE_PRICE and err["credits_remaining"] == 3
    assert balance(billing_server, key) == 3


def test_no_secret_in_logs(billing_server: Server) -> None:
    key = billing_server.new_key(20)
    with billing_server.client(key) as c:
        c.post("/v1/inpaint", files=ERASE_FILES)
        c.get("/v1/account", headers={"Authorization": f"Bearer {key}x"})
    time.sleep(0.5)
    log = billing_server.log.read_text()
    assert key not in log and key[:-1] not in log
    assert ADMIN_TOKEN not in log


def test_killed_process_leaves_no_credits_held(
    tmp_path: Path, repo_weights: Path, database_url: str
) -> None:
    """SIGKILL between hold and capture: after the hold's expiry the credits are back, and the
    call's Idempotency-Key is free again: its retry runs and is charged once."""
    weights = linked_weights(tmp_path / "weights", repo_weights, None)
    env = {
        "IMGSVC_DATABASE_URL": database_url,
        "IMGSVC_HOLD_TTL_SECONDS": "3",
        "IMGSVC_SWEEP_INTERVAL_SECONDS": "0.5",
        "IMGSVC_PRELOAD_MODELS": "false",
    }
    first = start_server(tmp_path, weights, **env)
    key = first.new_key(1000)
    db = Database(database_url)
    info = keys.authenticate(db, key)
    slow = io.BytesIO()
    Image.new("RGB", (160, 160), "white").save(slow, "PNG")

    files = {"image": ("s.png", slow.getvalue(), "image/png")}
    retry_key = {"Idempotency-Key": "killed-call-1"}

    def call() -> None:
        with first.client(key) as c, pytest.raises(httpx.TransportError):
            c.post("/v1/upscale", files=files, headers=retry_key)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 120
    while metering.held_credits(db, info.account_id) == 0:
        assert time.monotonic() < deadline, "the call never placed its hold"
        time.sleep(0.1)
    assert keys.get_key(db, info.id).credits < 1000
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    caller.join()
    second = start_server(tmp_path, weights, **env)
    try:
        deadline = time.monotonic() + 90
        while metering.held_credits(db, info.account_id) != 0:
            assert time.monotonic() < deadline, "the dead call's hold was never released"
            time.sleep(0.2)
        assert keys.get_key(db, info.id).credits == 1000
        assert metering.ledger_mismatches(db) == []
        with second.client(key) as c:
            deadline = time.monotonic() + 30
            while (r := c.post("/v1/upscale", files=files, headers=retry_key)).status_code == 409:
                assert r.json()["error"]["code"] == "idempotency_in_progress"
                assert time.monotonic() < deadline, "the dead call's key was never freed"
                time.sleep(0.5)
            assert r.status_code == 200, r.text
            charged = int(r.headers["X-Credits-Charged"])
            replay = c.post("/v1/upscale", files=files, headers=retry_key)
            assert replay.headers["Idempotent-Replayed"] == "true"
            assert replay.content == r.content
        assert keys.get_key(db, info.id).credits == 1000 - charged
        assert metering.ledger_mismatches(db) == []
    finally:
        stop_server(second)
        db.dispose()
