"""The real service over HTTP: the three operations, metering, errors."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.utils import DATA, Server, photo_bytes


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def credits_of(server: Server, key: str) -> int:
    with server.client(key) as c:
        return int(c.get("/v1/account").json()["credits"])


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]


def test_health_and_docs(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        spec = c.get("/openapi.json").json()
        for path in ("/v1/remove-background", "/v1/upscale", "/v1/inpaint", "/v1/usage"):
            assert path in spec["paths"]
        models = c.get("/v1/models").json()["data"]
        names = {(m["operation"], m["name"]) for m in models if m["present"]}
        assert ("remove-background", "u2netp") in names
        u2netp = next(m for m in models if m["name"] == "u2netp")
        assert u2netp["version"] == "309c8469258d" and u2netp["size_bytes"] == 4574861
        assert ("upscale", "realesrgan-x4plus") in names
        assert ("inpaint", "tiny-sd-inpaint") in names


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no key"),
        ({"Authorization": "Bearer nope"}, "malformed"),
        ({"X-API-Key": "isk_" + "a" * 32 + "_AAAAAA"}, "bad checksum"),
    ],
)
def test_auth_refused(server: Server, headers: dict[str, str], why: str) -> None:
    with httpx.Client(base_url=server.url, headers=headers) as c:
        assert_error(c.get("/v1/account"), 401, "unauthorized")
        files = {"image": ("a.jpg", photo_bytes(), "image/jpeg")}
        assert_error(c.post("/v1/remove-background", files=files), 401, "unauthorized")


def test_revoked_key_refused(server: Server) -> None:
    key = server.new_key(5)
    with server.client(key) as c:
        key_id = c.get("/v1/account").json()["id"]
        server.cli("keys", "revoke", str(key_id))
        assert_error(c.get("/v1/account"), 401, "unauthorized")


def test_remove_background_matches_rembg(
    server: Server, repo_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = server.new_key(100)
    data = photo_bytes("car.jpg")
    with server.client(key) as c:
        resp = c.post("/v1/remove-background", files={"image": ("car.jpg", data, "image/jpeg")})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["X-Credits-Charged"] == "10"
    assert resp.headers["X-Credits-Remaining"] == "90"
    assert resp.headers["X-Model"] == "u2netp"
    out = Image.open(io.BytesIO(resp.content))
    assert out.mode == "RGBA"
    src = Image.open(io.BytesIO(data)).convert("RGB")
    assert out.size == src.size

    monkeypatch.setenv("U2NET_HOME", str(repo_weights / "rembg"))
    from rembg import new_session, remove

    expected = remove(src, session=new_session("u2netp"))
    ours = np.asarray(out.getchannel("A"), dtype=np.int16)
    theirs = np.asarray(expected.getchannel("A"), dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1
    # The cut-out separates something: neither empty nor the whole frame.
    assert 0.05 < (ours > 127).mean() < 0.95


def test_output_formats(server: Server) -> None:
    key = server.new_key(100)
    with server.client(key) as c:
        for fmt, media in (("webp", "image/webp"), ("jpg", "image/jpeg")):
            resp = c.post(
                "/v1/remove-background",
                files={"image": ("car.jpg", photo_bytes(), "image/jpeg")},
                data={"format": fmt},
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"] == media
            Image.open(io.BytesIO(resp.content)).load()


def test_upscale_4x_and_2x(server: Server) -> None:
    key = server.new_key(10)
    small = Image.open(DATA / "car.jpg").convert("RGB").resize((40, 30), Image.Resampling.LANCZOS)
    with server.client(key) as c:
        resp = c.post("/v1/upscale", files={"image": ("s.png", png_bytes(small), "image/png")})
        assert resp.status_code == 200, resp.text
        assert Image.open(io.BytesIO(resp.content)).size == (160, 120)
        assert resp.headers["X-Model"] == "realesrgan-x4plus"
        assert resp.headers["X-Credits-Charged"] == "2"  # the minimum upscale price
        resp = c.post(
            "/v1/upscale",
            files={"image": ("s.png", png_bytes(small), "image/png")},
            data={"scale": "2", "model": "realesr-animevideov3"},
        )
        assert resp.status_code == 200, resp.text
        assert Image.open(io.BytesIO(resp.content)).size == (80, 60)
    assert credits_of(server, key) == 6


def test_upscale_refusals_charge_nothing(server: Server) -> None:
    key = server.new_key(3)
    img = ("s.png", png_bytes(Image.new("RGB", (16, 16), "red")), "image/png")
    with server.client(key) as c:
        r = c.post("/v1/upscale", files={"image": img}, data={"model": "no-such-model"})
        assert_error(r, 422, "unknown_model")
        r = c.post("/v1/upscale", files={"image": img}, data={"scale": "9"})
        assert_error(r, 422, "invalid_request")
        big = ("b.png", png_bytes(Image.new("RGB", (3000, 3000), "red")), "image/png")
        r = c.post("/v1/upscale", files={"image": big})
        assert_error(r, 422, "invalid_input")
        assert "limit" in r.json()["error"]["message"]
    assert credits_of(server, key) == 3


def test_bad_uploads_charge_nothing(server: Server) -> None:
    key = server.new_key(2)
    with server.client(key) as c:
        r = c.post("/v1/remove-background", files={"image": ("x.txt", b"hello", "text/plain")})
        assert_error(r, 415, "unsupported_media_type")
        truncated = photo_bytes()[:2000]
        r = c.post("/v1/remove-background", files={"image": ("t.jpg", truncated, "image/jpeg")})
        assert_error(r, 422, "invalid_image")
        r = c.post("/v1/remove-background", files={"image": ("e.jpg", b"", "image/jpeg")})
        assert r.status_code == 422
        r = c.post("/v1/remove-background")  # none of image, image_url, image_base64
        assert_error(r, 422, "invalid_input")
    assert credits_of(server, key) == 2


def test_insufficient_credits_is_402_and_uncharged(server: Server) -> None:
    key = server.new_key(0)
    with server.client(key) as c:
        r = c.post("/v1/remove-background", files={"image": ("a.jpg", photo_bytes(), "image/jpeg")})
        assert_error(r, 402, "insufficient_credits")
        assert r.headers["X-Credits-Required"] == "10"
        assert r.headers["X-Credits-Remaining"] == "0"
        assert c.get("/v1/usage").json()["data"] == []


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def test_erase_keeps_pixels_outside_mask(server: Server) -> None:
    key = server.new_key(10)
    src = Image.open(DATA / "car.jpg").convert("RGB")
    mask = _mask(src.size, (200, 150, 280, 210))
    with server.client(key) as c:
        r = c.post(
            "/v1/inpaint",
            files={
                "image": ("car.png", png_bytes(src), "image/png"),
                "mask": ("mask.png", png_bytes(mask), "image/png"),
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["X-Model"] == "opencv-telea"
    out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    inside = np.asarray(mask) > 127
    assert np.array_equal(out[~inside], np.asarray(src)[~inside])
    assert not np.array_equal(out[inside], np.asarray(src)[inside])


def test_inpaint_bad_masks_are_422_uncharged(server: Server) -> None:
    key = server.new_key(2)
    src = png_bytes(Image.new("RGB", (64, 48), "gray"))
    with server.client(key) as c:
        for mask in (_mask((32, 32), (0, 0, 8, 8)), Image.new("L", (64, 48), 0)):
            r = c.post(
                "/v1/inpaint",
                files={
                    "image": ("i.png", src, "image/png"),
                    "mask": ("m.png", png_bytes(mask), "image/png"),
                },
            )
            assert r.status_code == 422, r.text
    assert credits_of(server, key) == 2


def test_prompt_inpaint_with_tiny_pipeline(server: Server) -> None:
    key = server.new_key(50)
    src = Image.open(DATA / "car.jpg").convert("RGB").resize((96, 72))
    mask = _mask(src.size, (30, 20, 70, 50))
    files = {
        "image": ("car.png", png_bytes(src), "image/png"),
        "mask": ("mask.png", png_bytes(mask), "image/png"),
    }
    form = {"prompt": "a red box", "seed": "7", "steps": "2", "guidance_scale": "5"}
    form |= {"grow_mask": "0", "mask_blur": "0"}  # so "outside" is exactly the sent mask
    with server.client(key) as c:
        first = c.post("/v1/inpaint", files=files, data=form)
        assert first.status_code == 200, first.text
        assert first.headers["X-Seed"] == "7"
        assert first.headers["X-Model"] == "tiny-sd-inpaint"
        # 10 base + ceil(4 credits x 2 steps x 64x48 working pixels / 1e6) = 11
        assert first.headers["X-Credits-Charged"] == "11"
        again = c.post("/v1/inpaint", files=files, data=form)
        assert again.content == first.content
    out = np.asarray(Image.open(io.BytesIO(first.content)).convert("RGB"))
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], np.asarray(src)[outside])


def test_usage_matches_calls(server: Server) -> None:
    key = server.new_key(30)
    with server.client(key) as c:
        for _ in range(2):
            r = c.post(
                "/v1/remove-background", files={"image": ("a.jpg", photo_bytes(), "image/jpeg")}
            )
            assert r.status_code == 200
        ids = {r.headers["X-Request-Id"]}
        c.post("/v1/upscale", files={"image": ("x", b"junk", "image/png")})  # refused, uncharged
        page = c.get("/v1/usage").json()
        assert len(page["data"]) == 2
        assert all(
            u["operation"] == "remove-background" and u["credits"] == 10 for u in page["data"]
        )
        assert ids <= {u["request_id"] for u in page["data"]}
        assert page["data"][0]["input_width"] == 480
        csv_text = c.get("/v1/usage", headers={"Accept": "text/csv"}).text
        assert csv_text.splitlines()[0].startswith("request_id,key_id,operation,model")
        assert len(csv_text.strip().splitlines()) == 3
        assert c.get("/v1/usage", params={"operation": "upscale"}).json()["data"] == []
    assert credits_of(server, key) == 10
    assert "ledger ok" in server.cli("billing", "verify")


def test_dry_run_quotes_without_charging(server: Server) -> None:
    key = server.new_key(10)
    img = png_bytes(Image.new("RGB", (500, 400), "white"))
    with server.client(key) as c:
        r = c.post(
            "/v1/upscale?dry_run=true",
            files={"image": ("q.png", img, "image/png")},
            data={"scale": "4"},
        )
        assert r.status_code == 200, r.text
        quote = r.json()
        assert (quote["output_width"], quote["output_height"]) == (2000, 1600)
        assert quote["credits"] == 32 == int(r.headers["X-Credits-Would-Charge"])
    assert credits_of(server, key) == 10
