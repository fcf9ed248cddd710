"""A client that hangs up before its result is ready is not charged: the hold is released."""

from __future__ import annotations

import io
import time

import httpx
from PIL import Image

from tests.utils import DATA, Server


def test_hung_up_call_is_released_not_charged(server: Server) -> None:
    key = server.new_key(100)
    buf = io.BytesIO()
    Image.open(DATA / "car.jpg").convert("RGB").resize((200, 150)).save(buf, "PNG")
    files = {"image": ("car.png", buf.getvalue(), "image/png")}  # x4plus: seconds of work
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=1.0) as c:
        try:
            c.post("/v1/upscale", files=files)
            raise AssertionError("the call should still be running when the client leaves")
        except httpx.ReadTimeout:
            pass  # the client hangs up with the work under way
    small = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(small, "PNG")
    with server.client(key) as c:
        # One upscale at a time: this one runs only after the abandoned one has settled.
        r = c.post(
            "/v1/upscale",
            files={"image": ("s.png", small.getvalue(), "image/png")},
            data={"model": "realesr-animevideov3"},
        )
        assert r.status_code == 200, r.text
        charged = int(r.headers["X-Credits-Charged"])
        deadline = time.monotonic() + 30  # the abandoned call's release may trail by moments
        while c.get("/v1/account").json()["credits"] != 100 - charged:
            assert time.monotonic() < deadline, "the abandoned call was charged"
            time.sleep(0.2)
        usage = c.get("/v1/usage").json()["data"]
        assert [u["request_id"] for u in usage] == [r.headers["X-Request-Id"]]
    assert "ledger ok" in server.cli("billing", "verify")
