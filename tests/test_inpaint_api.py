"""POST /v1/inpaint over HTTP: prompt, erase, options, untouched pixels, seeds, refusals, queue."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.utils import Server, linked_weights, start_server, stop_server

W, H = 1000, 700
BOX = (610, 280, 660, 330)


@pytest.fixture(scope="module")
def inpaint_server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path, tiny_pipeline_dir: Path
) -> Iterator[Server]:
    """A server with the tiny pipeline as a folder and as a single file, and a queue of 1."""
    from imgsvc.testing.ldm_export import export_single_file

    tmp = tmp_path_factory.mktemp("inpaint-server")
    weights = linked_weights(tmp / "weights", repo_weights, tiny_pipeline_dir)
    diffusers_dir = weights / "diffusers"
    export_single_file(tiny_pipeline_dir, diffusers_dir / "tiny-single.safetensors")
    shutil.copytree(
        tiny_pipeline_dir,
        diffusers_dir / "tiny-single.config",
        ignore=shutil.ignore_patterns("*.safetensors"),
    )
    srv = start_server(tmp, weights, IMGSVC_INPAINT_QUEUE_DEPTH="0", IMGSVC_PRELOAD_MODELS="false")
    yield srv
    stop_server(srv)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def photo() -> Image.Image:
    rng = np.random.default_rng(11)
    base = np.linspace(0, 255, W, dtype=np.float32)[None, :, None].repeat(H, 0).repeat(3, 2)
    noise = rng.normal(0, 12, (H, W, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def box_mask(box: tuple[int, int, int, int] = BOX, size: tuple[int, int] = (W, H)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def changed_zone(mask: Image.Image, px: int) -> np.ndarray:
    """Every pixel within `px` (square) of the mask: where the output may differ."""
    ys, xs = np.nonzero(np.asarray(mask) > 127)
    zone = np.zeros((mask.height, mask.width), dtype=bool)
    zone[max(0, ys.min() - px) : ys.max() + px + 1, max(0, xs.min() - px) : xs.max() + px + 1] = (
        True
    )
    return zone


def credits(srv: Server, key: str) -> int:
    with srv.client(key) as c:
        return int(c.get("/v1/account").json()["credits"])


def post(c: httpx.Client, image: bytes, mask: bytes | None = None, **form: str) -> httpx.Response:
    files = {"image": ("i.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("m.png", mask, "image/png")
    return c.post("/v1/inpaint", files=files, data=form)


def test_prompt_inpaint_1000x700_keeps_every_pixel_outside(inpaint_server: Server) -> None:
    key = inpaint_server.new_key(500)
    src, mask = photo(), box_mask()
    form = {"prompt": "a red apple", "seed": "123", "steps": "3", "grow_mask": "6"}
    form["mask_blur"] = "5"
    with inpaint_server.client(key) as c:
        first = post(c, png(src), png(mask), **form)
        assert first.status_code == 200, first.text
        again = post(c, png(src), png(mask), **form)
        other = post(c, png(src), png(mask), **{**form, "seed": "124"})
    assert first.headers["X-Seed"] == "123"
    assert first.headers["X-Model"] == "tiny-sd-inpaint"
    assert (first.headers["X-Width"], first.headers["X-Height"]) == ("1000", "700")
    assert again.content == first.content  # same seed, same device: same bytes
    assert other.content != first.content
    # 10 + ceil(4 x 3 steps x 64x64 working pixels / 1e6): a crop at native size, not 1000x700
    assert first.headers["X-Credits-Charged"] == "11"
    out = np.asarray(Image.open(io.BytesIO(first.content)).convert("RGB"))
    outside = ~changed_zone(mask, 6 + 5)
    assert np.array_equal(out[outside], np.asarray(src)[outside])
    inside = np.asarray(mask) > 0
    assert not np.array_equal(out[inside], np.asarray(src)[inside])
    assert credits(inpaint_server, key) == 500 - 3 * 11


def test_single_file_checkpoint_over_http(inpaint_server: Server) -> None:
    key = inpaint_server.new_key(100)
    src, mask = photo().resize((96, 72)), box_mask((30, 20, 70, 50), (96, 72))
    form = {"prompt": "a red box", "seed": "7", "steps": "2", "scheduler": "euler_a"}
    with inpaint_server.client(key) as c:
        folder = post(c, png(src), png(mask), **form, model="tiny-sd-inpaint")
        single = post(c, png(src), png(mask), **form, model="tiny-single")
        models = c.get("/v1/models").json()["data"]
    assert folder.status_code == 200 and single.status_code == 200, single.text
    assert single.headers["X-Model"] == "tiny-single"
    assert single.content == folder.content  # same weights, loaded from the LDM layout
    rows = {m["name"]: m for m in models if m["operation"] == "inpaint"}
    assert rows["tiny-single"]["path"] == "diffusers/tiny-single.safetensors"
    assert rows["opencv-telea"]["default"] and not rows["lama"]["present"]


def test_erase_with_boxes_and_alpha(inpaint_server: Server) -> None:
    key = inpaint_server.new_key(100)
    src = photo()
    with inpaint_server.client(key) as c:
        boxes = post(c, png(src), mask_boxes=json.dumps([[610, 280, 50, 50]]), grow_mask="3")
        assert boxes.status_code == 200, boxes.text
        assert boxes.headers["X-Model"] == "opencv-telea"
        assert boxes.headers["X-Credits-Charged"] == "10"
        rgba = src.convert("RGBA")
        rgba.paste((0, 0, 0, 0), BOX)
        alpha = post(c, png(rgba), model="opencv-ns")
        assert alpha.status_code == 200, alpha.text
        assert alpha.headers["X-Model"] == "opencv-ns"
    out = np.asarray(Image.open(io.BytesIO(boxes.content)).convert("RGB"))
    outside = ~changed_zone(box_mask(), 3)
    assert np.array_equal(out[outside], np.asarray(src)[outside])
    filled = Image.open(io.BytesIO(alpha.content))
    assert filled.mode == "RGB"  # the transparent hole was filled: the result is opaque
    filled_arr = np.asarray(filled)
    outside = ~changed_zone(box_mask(), 0)
    assert np.array_equal(filled_arr[outside], np.asarray(src)[outside])
    left, top, right, bottom = BOX
    assert filled_arr[top:bottom, left:right].mean() > 20  # not the black under the hole


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("mask of another size", "invalid_image"),
        ("empty mask", "invalid_input"),
        ("opaque image, no mask", "invalid_input"),
        ("bad boxes", "invalid_input"),
        ("too many steps", "invalid_input"),
        ("steps x strength below 1", "invalid_input"),
        ("prompt over the token limit", "invalid_input"),
        ("prompt over 1000 characters", "invalid_request"),
        ("grow_mask too large", "invalid_request"),
        ("unknown scheduler", "invalid_request"),
        ("unknown model", "unknown_model"),
    ],
)
def test_bad_requests_are_422_uncharged(inpaint_server: Server, case: str, code: str) -> None:
    key = inpaint_server.new_key(50)
    small = png(Image.new("RGB", (64, 48), "gray"))
    good_mask = png(box_mask((8, 8, 20, 20), (64, 48)))
    prompt = {"prompt": "a cat", "steps": "2"}
    requests: dict[str, tuple[bytes | None, dict[str, str]]] = {
        "mask of another size": (png(box_mask((0, 0, 8, 8), (32, 32))), {}),
        "empty mask": (png(Image.new("L", (64, 48), 0)), prompt),
        "opaque image, no mask": (None, {}),
        "bad boxes": (None, {"mask_boxes": "[[100, 100, 5, 5]]"}),
        "too many steps": (good_mask, {**prompt, "steps": "101"}),
        "steps x strength below 1": (good_mask, {**prompt, "strength": "0.2"}),
        "prompt over the token limit": (good_mask, {"prompt": "red " * 100}),
        "prompt over 1000 characters": (good_mask, {"prompt": "x" * 1001}),
        "grow_mask too large": (good_mask, {"grow_mask": "100000"}),
        "unknown scheduler": (good_mask, {**prompt, "scheduler": "magic"}),
        "unknown model": (good_mask, {"model": "nope"}),
    }
    mask, form = requests[case]
    with inpaint_server.client(key) as c:
        r = post(c, small, mask, **form)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["request_id"] == r.headers["X-Request-Id"]
    assert credits(inpaint_server, key) == 50


def test_full_queue_is_503_with_retry_after_uncharged(inpaint_server: Server) -> None:
    key = inpaint_server.new_key(1000)
    src, mask = png(photo().resize((96, 72))), png(box_mask((30, 20, 70, 50), (96, 72)))
    form = {"prompt": "a slow red box", "seed": "1", "steps": "60"}  # ~1 s each on one thread

    def call(_: int) -> httpx.Response:
        with inpaint_server.client(key) as c:
            return post(c, src, mask, **form)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(call, range(4)))
    ok = [r for r in answers if r.status_code == 200]
    busy = [r for r in answers if r.status_code == 503]
    assert ok and busy, [r.status_code for r in answers]
    assert len(ok) + len(busy) == 4
    for r in busy:
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
    charged = sum(int(r.headers["X-Credits-Charged"]) for r in ok)
    assert credits(inpaint_server, key) == 1000 - charged
