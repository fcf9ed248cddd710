"""POST /v1/upscale and GET /v1/models over HTTP: dropped-in models, sizes, alpha, refusals."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.upscale_helpers import logo, save_tiny_compact
from tests.utils import DATA, Server, start_server, stop_server


@pytest.fixture(scope="module")
def upscale_server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path
) -> Iterator[Server]:
    """The service with the pulled weights plus a user-dropped tiny Compact x2 `.pth`."""
    tmp = tmp_path_factory.mktemp("upscale-server")
    weights = tmp / "weights"
    (weights / "upscale").mkdir(parents=True)
    (weights / "rembg").symlink_to(repo_weights / "rembg", target_is_directory=True)
    for f in (repo_weights / "upscale").iterdir():
        (weights / "upscale" / f.name).symlink_to(f)
    save_tiny_compact(weights / "upscale" / "my-tiny-x2.pth", scale=2)
    (weights / "upscale" / "notes.pth").write_bytes(b"not a model")
    srv = start_server(tmp, weights, IMGSVC_MAX_OUTPUT_PIXELS="4000000")
    yield srv
    stop_server(srv)


def png(img: Image.Image) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return ("in.png", buf.getvalue(), "image/png")


def small_photo(size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.open(DATA / "car.jpg").convert("RGB").resize(size, Image.Resampling.LANCZOS)


def credits(c: httpx.Client) -> int:
    return int(c.get("/v1/account").json()["credits"])


def error_code(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    code: str = resp.json()["error"]["code"]
    return code


def test_models_lists_dropped_file_with_scale_and_size(upscale_server: Server) -> None:
    with upscale_server.client() as c:
        rows = {
            m["name"]: m for m in c.get("/v1/models").json()["data"] if m["operation"] == "upscale"
        }
    tiny = rows["my-tiny-x2"]
    assert tiny["present"] and tiny["scale"] == 2 and tiny["size_bytes"] > 1000
    assert "Compact" in tiny["note"] and len(tiny["version"]) == 12
    x4 = rows["realesrgan-x4plus"]
    assert x4["default"] and x4["scale"] == 4 and x4["cpu_seconds_per_input_mp"] > 0
    assert rows["realesr-animevideov3"]["scale"] == 4
    assert "cannot load" in rows["notes"]["note"]
    assert rows["face_enhance"]["present"] is False
    assert "GFPGANv1.4.pth" in rows["face_enhance"]["note"]


def test_dropped_model_is_used(upscale_server: Server) -> None:
    key = upscale_server.new_key(100)
    with upscale_server.client(key) as c:
        r = c.post(
            "/v1/upscale",
            files={"image": png(small_photo())},
            data={"model": "my-tiny-x2", "scale": "2"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["X-Model"] == "my-tiny-x2"
        assert Image.open(io.BytesIO(r.content)).size == (80, 60)
        r = c.post("/v1/upscale", files={"image": png(small_photo())}, data={"model": "notes"})
        assert error_code(r, 422) == "unknown_model"


def test_any_scale_and_target_sizes(upscale_server: Server) -> None:
    key = upscale_server.new_key(100)
    form = {"model": "realesr-animevideov3"}
    with upscale_server.client(key) as c:
        for extra, size in [
            ({"scale": "1.5"}, (60, 45)),
            ({"scale": "8"}, (320, 240)),
            ({"target_width": "100"}, (100, 75)),
            ({"target_width": "200", "target_height": "60"}, (80, 60)),
        ]:
            r = c.post("/v1/upscale", files={"image": png(small_photo())}, data={**form, **extra})
            assert r.status_code == 200, r.text
            assert Image.open(io.BytesIO(r.content)).size == size
            assert (r.headers["X-Width"], r.headers["X-Height"]) == tuple(map(str, size))


def test_rgba_in_rgba_out_over_http(upscale_server: Server) -> None:
    key = upscale_server.new_key(100)
    with upscale_server.client(key) as c:
        for fmt, mode in [("png", "RGBA"), ("webp", "RGBA"), ("jpg", "RGB")]:
            r = c.post(
                "/v1/upscale",
                files={"image": png(logo(48))},
                data={"model": "realesr-animevideov3", "format": fmt, "quality": "80"},
            )
            assert r.status_code == 200, r.text
            out = Image.open(io.BytesIO(r.content))
            assert (out.size, out.mode) == ((192, 192), mode)
            if mode == "RGBA":
                alpha = np.asarray(out)[..., 3]
                assert alpha[0, 0] == 0 and alpha[96, 96] == 255


def test_refusals_charge_nothing(upscale_server: Server) -> None:
    key = upscale_server.new_key(50)
    img = png(small_photo())
    with upscale_server.client(key) as c:
        r = c.post("/v1/upscale", files={"image": img}, data={"face_enhance": "true"})
        assert error_code(r, 503) == "model_unavailable"
        assert "GFPGANv1.4.pth" in r.json()["error"]["message"]
        r = c.post("/v1/upscale", files={"image": img}, data={"scale": "2", "target_width": "80"})
        assert error_code(r, 422) == "invalid_input"
        r = c.post("/v1/upscale", files={"image": img}, data={"target_width": "20"})
        assert error_code(r, 422) == "invalid_input"
        r = c.post("/v1/upscale", files={"image": img}, data={"scale": "0.5"})
        assert error_code(r, 422) == "invalid_request"
        big = png(Image.new("RGB", (600, 600), "red"))  # x4 = 5.76 MP > the 4 MP limit
        r = c.post("/v1/upscale", files={"image": big})
        assert error_code(r, 422) == "invalid_input"
        assert "4000000" in r.json()["error"]["message"]
        r = c.post("/v1/upscale", files={"image": big}, data={"scale": "1"})  # x4 pass too big
        assert error_code(r, 422) == "invalid_input"
        assert "x4" in r.json()["error"]["message"]
        assert credits(c) == 50
