"""POST /v1/remove-background and /v1.0/removebg over real HTTP: inputs, options, presets,
charging only useful results, the URL guard, and remove.bg compatibility."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pillow_heif
import pytest
from PIL import Image

from tests.utils import DATA, Server, linked_weights, photo_bytes, start_server, stop_server

ROUTE = "/v1/remove-background"


def credits_of(server: Server, key: str) -> int:
    with server.client(key) as c:
        return int(c.get("/v1/account").json()["credits"])


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def car_on_canvas() -> Image.Image:
    """The car photo, non-square, so a rotation would change the size."""
    return Image.open(DATA / "car.jpg").convert("RGB").resize((240, 180))


@pytest.fixture(scope="module")
def trusting_server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path
) -> Iterator[Server]:
    """A server whose operator allows image_url to reach 127.0.0.1 (and nothing else private)."""
    tmp = tmp_path_factory.mktemp("trusting")
    srv = start_server(
        tmp,
        linked_weights(tmp / "weights", repo_weights, None),
        IMGSVC_URL_FETCH_ALLOW_CIDRS="127.0.0.1/32",
    )
    yield srv
    stop_server(srv)


def test_headers_model_version_and_fidelity(server: Server) -> None:
    key = server.new_key(100)
    with server.client(key) as c:
        r = c.post(ROUTE, files={"image": ("car.jpg", photo_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["X-Model"] == "u2netp"
    assert r.headers["X-Model-Version"] == "309c8469258d"
    assert r.headers["X-Credits-Charged"] == "10"
    assert "X-Warning" not in r.headers
    assert int(r.headers["X-Foreground-Width"]) > 100


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_phone_photo_comes_back_upright(server: Server, fmt: str, orientation: int) -> None:
    """A phone JPEG (EXIF orientation) or HEIC (stored rotated, irot) → the upright cut-out."""
    pillow_heif.register_heif_opener()
    upright = car_on_canvas()
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(stored, fmt, exif=exif.tobytes(), quality=95)
    key = server.new_key(20)
    with server.client(key) as c:
        r = c.post(ROUTE, files={"image": ("photo", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.size == upright.size
    diff = np.abs(np.asarray(out.convert("RGB"), dtype=int) - np.asarray(upright, dtype=int))
    alpha = np.asarray(out.getchannel("A")) >= 200
    assert alpha.mean() > 0.05
    assert diff[alpha].mean() < 8  # the kept pixels are the upright photo's


def test_heic_cmyk_16bit_and_avif_inputs(server: Server) -> None:
    photo = car_on_canvas()
    arr16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    pillow_heif.register_heif_opener()
    inputs = {
        "heic": encoded(photo, "HEIF", quality=90),
        "avif": encoded(photo, "AVIF", quality=90),
        "cmyk": encoded(photo.convert("CMYK"), "JPEG", quality=95),
        "png16": encoded(Image.fromarray(arr16), "PNG"),
    }
    key = server.new_key(100)
    with server.client(key) as c:
        for name, data in inputs.items():
            r = c.post(ROUTE, files={"image": (name, data, "application/octet-stream")})
            assert r.status_code == 200, (name, r.text)
            out = Image.open(io.BytesIO(r.content))
            assert out.size == photo.size and out.mode == "RGBA", name
            coverage = (np.asarray(out.getchannel("A")) > 127).mean()
            assert 0.05 < coverage < 0.95, name


def test_base64_input_and_exactly_one_source(server: Server) -> None:
    key = server.new_key(30)
    b64 = base64.b64encode(photo_bytes()).decode()
    with server.client(key) as c:
        r = c.post(ROUTE, data={"image_base64": f"data:image/jpeg;base64,{b64}"})
        assert r.status_code == 200, r.text
        r = c.post(
            ROUTE,
            data={"image_base64": b64},
            files={"image": ("car.jpg", photo_bytes(), "image/jpeg")},
        )
        assert_error(r, 422, "invalid_input")
        assert_error(c.post(ROUTE, data={"image_base64": "%%%"}), 422, "invalid_input")
        assert_error(c.post(ROUTE, data={"format": "png"}), 422, "invalid_input")
    assert credits_of(server, key) == 20


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jpg",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://10.0.0.8/x.jpg",
        "http://[::1]/x.jpg",
        "http://localhost/x.jpg",
        "file:///etc/passwd",
    ],
)
def test_private_image_url_refused_uncharged(server: Server, url: str) -> None:
    key = server.new_key(10)
    with server.client(key) as c:
        assert_error(c.post(ROUTE, data={"image_url": url}), 422, "url_not_allowed")
        r = c.post(
            ROUTE,
            data={"bg_image_url": url},
            files={"image": ("car.jpg", photo_bytes(), "image/jpeg")},
        )
        assert_error(r, 422, "url_not_allowed")
    assert credits_of(server, key) == 10


def test_image_url_fetch_and_redirects(trusting_server: Server, origin: str) -> None:
    key = trusting_server.new_key(20)
    with trusting_server.client(key) as c:
        r = c.post(ROUTE, data={"image_url": f"{origin}/car.jpg"})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (480, 360)
        for target in ("http://169.254.169.254/", "http://10.0.0.8/x.jpg", "http://[::1]/x"):
            r = c.post(ROUTE, data={"image_url": f"{origin}/to/{target}"})
            assert_error(r, 422, "url_not_allowed")
    assert credits_of(trusting_server, key) == 10


def test_empty_mask_is_flagged_and_free(server: Server) -> None:
    key = server.new_key(10)
    blank = encoded(Image.new("RGB", (160, 120), "white"), "PNG")
    with server.client(key) as c:
        r = c.post(ROUTE, files={"image": ("blank.png", blank, "image/png")})
    assert r.status_code == 200, r.text
    assert r.headers["X-Warning"].startswith("empty_mask")
    assert r.headers["X-Credits-Charged"] == "0"
    assert credits_of(server, key) == 10


@pytest.mark.parametrize("preset", ["amazon", "etsy", "ebay", "shopify", "square"])
def test_presets_comply(server: Server, preset: str) -> None:
    key = server.new_key(20)
    with server.client(key) as c:
        r = c.post(
            ROUTE,
            data={"preset": preset},
            files={"image": ("car.jpg", photo_bytes(), "image/jpeg")},
        )
    assert r.status_code == 200, r.text
    assert r.headers["X-Compliance"] == "pass"
    out = Image.open(io.BytesIO(r.content))
    expected = {"amazon": (2000, 2000), "etsy": (2700, 2025), "shopify": (2048, 2048)}
    if preset in expected:
        assert out.size == expected[preset]
    assert out.format == ("PNG" if preset == "shopify" else "JPEG")


def test_bad_layout_fails_compliance(server: Server) -> None:
    key = server.new_key(20)
    with server.client(key) as c:
        r = c.post(
            ROUTE,
            data={"preset": "amazon", "scale": "40%", "bg_color": "f2f2f2"},
            files={"image": ("car.jpg", photo_bytes(), "image/jpeg")},
        )
    assert r.status_code == 200, r.text
    verdict = r.headers["X-Compliance"]
    assert verdict.startswith("fail; reasons=")
    assert "fill_0.40_below_0.85" in verdict and "background_not_pure_white" in verdict


def test_layout_options_over_http(server: Server) -> None:
    key = server.new_key(100)
    files = {"image": ("car.jpg", photo_bytes(), "image/jpeg")}
    with server.client(key) as c:
        r = c.post(ROUTE, data={"crop": "true", "crop_margin": "10px"}, files=files)
        assert r.status_code == 200, r.text
        w, h = int(r.headers["X-Width"]), int(r.headers["X-Height"])
        assert (w, h) == (
            int(r.headers["X-Foreground-Width"]) + 20,
            int(r.headers["X-Foreground-Height"]) + 20,
        )
        r = c.post(ROUTE, data={"bg_color": "#00ff00", "format": "jpg"}, files=files)
        assert r.headers["content-type"] == "image/jpeg"
        corner = Image.open(io.BytesIO(r.content)).convert("RGB").getpixel((2, 2))
        assert isinstance(corner, tuple) and corner[1] > 240 and corner[0] < 20
        r = c.post(ROUTE, data={"size": "preview"}, files=files)
        assert r.headers["X-Credits-Charged"] == "3"
        assert int(r.headers["X-Width"]) * int(r.headers["X-Height"]) <= 250_000
        for bad in ({"crop_margin": "90%", "crop": "true"}, {"bg_color": "nope"}, {"roi": "1 2"}):
            assert_error(c.post(ROUTE, data=bad, files=files), 422, "invalid_input")
        assert_error(c.post(ROUTE, data={"preset": "walmart"}, files=files), 422, "invalid_request")


def test_removebg_client_request_works_unchanged(server: Server) -> None:
    """What remove.bg's docs show (curl -H 'X-Api-Key: …' -F image_file=@… -F size=auto)."""
    key = server.new_key(50)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post(
            "/v1.0/removebg",
            headers={"X-Api-Key": key},
            files={"image_file": ("car.jpg", photo_bytes(), "image/jpeg")},
            data={"size": "auto"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"  # format=auto with transparency
        assert r.headers["X-Credits-Charged"] == "10"
        assert (r.headers["X-Width"], r.headers["X-Height"]) == ("480", "360")
        assert r.headers["X-Type"] == "other"
        r = c.post(
            "/v1.0/removebg",
            headers={"X-Api-Key": key, "Accept": "application/json"},
            data={
                "image_file_b64": base64.b64encode(photo_bytes()).decode(),
                "bg_color": "white",
                "crop": "true",
            },
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        result = Image.open(io.BytesIO(base64.b64decode(data["result_b64"])))
        assert result.format == "JPEG"  # auto: opaque → jpg
        assert result.size == (data["foreground_width"], data["foreground_height"])
        assert r.headers["X-Credits-Charged"] == "3"  # remove.bg's default size is preview
        bad = c.post("/v1.0/removebg", headers={"X-Api-Key": key}, data={"size": "full"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["title"]
    assert credits_of(server, key) == 37
