"""DiffusionInpaintEngine on a tiny random Stable-Diffusion inpainting pipeline (CPU, offline)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgsvc.errors import InvalidInput, ModelUnavailable
from imgsvc.models.device import DeviceSpec
from imgsvc.models.inpaint.diffusion import SCHEDULERS, DiffusionInpaintEngine, find_pipelines
from tests.utils import one_torch_thread_no_network

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from imgsvc.testing.tiny_diffusion import build_tiny_inpaint_pipeline  # noqa: E402

CPU = DeviceSpec("cpu", None)
W, H = 96, 72
BOX = (24, 18, 72, 54)  # left, top, right, bottom of the repainted rectangle
INPAINT_ARGS: dict[str, Any] = {
    "prompt": "a red apple on the table",
    "negative_prompt": "blurry",
    "steps": 2,
    "guidance_scale": 7.5,
    "strength": 1.0,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_network() -> Iterator[None]:
    with one_torch_thread_no_network():
        yield


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    build_tiny_inpaint_pipeline(root / "diffusers" / "tiny-sd-inpaint", seed=0)
    (root / "diffusers" / "not-a-pipeline").mkdir()  # no model_index.json: ignored
    return root


@pytest.fixture(scope="module")
def engine(weights_dir: Path) -> DiffusionInpaintEngine:
    return DiffusionInpaintEngine(weights_dir / "diffusers" / "tiny-sd-inpaint", CPU)


def _image() -> Image.Image:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _mask() -> Image.Image:
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, BOX)
    return mask


def test_find_pipelines(weights_dir: Path, tmp_path: Path) -> None:
    found = find_pipelines(weights_dir)
    assert found == {"tiny-sd-inpaint": weights_dir / "diffusers" / "tiny-sd-inpaint"}
    assert find_pipelines(tmp_path) == {}


def test_engine_loads(engine: DiffusionInpaintEngine) -> None:
    assert engine.name == "tiny-sd-inpaint"
    assert engine.pipeline_class == "StableDiffusionInpaintPipeline"
    assert engine.native_size == 64  # unet sample_size 32 * vae_scale_factor 2


def test_inpaint_keeps_outside_and_changes_inside(engine: DiffusionInpaintEngine) -> None:
    image, mask = _image(), _mask()
    out = engine.inpaint(image, engine.plan(mask), seed=0, **INPAINT_ARGS)
    assert out.mode == "RGB"
    assert out.size == (W, H)
    src, dst = np.asarray(image), np.asarray(out)
    outside = np.asarray(mask) == 0
    assert np.array_equal(src[outside], dst[outside])
    left, top, right, bottom = BOX
    assert not np.array_equal(src[top:bottom, left:right], dst[top:bottom, left:right])


def test_same_seed_same_bytes_other_seed_differs(engine: DiffusionInpaintEngine) -> None:
    image, plan = _image(), engine.plan(_mask())
    first = engine.inpaint(image, plan, seed=42, **INPAINT_ARGS).tobytes()
    again = engine.inpaint(image, plan, seed=42, **INPAINT_ARGS).tobytes()
    other = engine.inpaint(image, plan, seed=43, **INPAINT_ARGS).tobytes()
    assert first == again
    assert first != other


def test_concurrent_calls_are_serialised(engine: DiffusionInpaintEngine) -> None:
    image, plan = _image(), engine.plan(_mask())
    expected = [engine.inpaint(image, plan, seed=s, **INPAINT_ARGS).tobytes() for s in (1, 2, 3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(engine.inpaint, image, plan, seed=s, **INPAINT_ARGS) for s in (1, 2, 3)
        ]
        got = [f.result().tobytes() for f in futures]
    assert got == expected


def test_validation_never_touches_the_pipelines_tokenizer(
    engine: DiffusionInpaintEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation may run while another call's pipeline is tokenizing in a worker thread; a fast
    tokenizer keeps per-call truncation/padding state, so sharing it mixed requests up under
    load (seen as a 500). Validation uses its own copies."""
    pipeline_tokenizer = engine._pipe.tokenizer
    calls: list[str] = []
    original = type(pipeline_tokenizer).__call__

    def spy(self: object, *args: object, **kwargs: object) -> object:
        if self is pipeline_tokenizer:
            calls.append(str(args[:1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline_tokenizer), "__call__", spy)
    engine.check(prompt="a red box", negative_prompt="blurry", steps=2, strength=1.0)
    assert calls == []
    image, plan = _image(), engine.plan(_mask())
    engine.inpaint(image, plan, seed=1, **INPAINT_ARGS)
    assert calls  # the spy does see the pipeline's own use


def test_no_tokenizer_serves_two_threads_at_once(
    engine: DiffusionInpaintEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls are prepared (validated) in worker threads while other calls validate or run the
    pipeline: a tokenizer object in use by one thread must never be entered by another."""
    tokenizer_type = type(engine._pipe.tokenizer)
    original = tokenizer_type.__call__
    active: dict[int, int] = {}  # id(tokenizer) -> thread using it now
    overlaps: list[str] = []
    guard = threading.Lock()

    def spy(self: object, *args: object, **kwargs: object) -> object:
        me = threading.get_ident()
        with guard:
            if active.get(id(self), me) != me:
                overlaps.append(f"tokenizer {id(self)} entered by two threads")
            active[id(self)] = me
        time.sleep(0.05)  # widen the window in which another thread could enter
        try:
            return original(self, *args, **kwargs)
        finally:
            with guard:
                active.pop(id(self), None)

    monkeypatch.setattr(tokenizer_type, "__call__", spy)
    start = threading.Barrier(4)
    image, plan = _image(), engine.plan(_mask())

    def validate(prompt: str) -> None:
        start.wait()
        engine.check(prompt=prompt, negative_prompt="blurry", steps=2, strength=1.0)

    def run() -> None:
        start.wait()
        engine.inpaint(image, plan, seed=1, **INPAINT_ARGS)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(validate, p) for p in ("a red box", "a cat", "a tree")]
        futures.append(pool.submit(run))
        for future in futures:
            future.result()
    assert overlaps == []


def test_every_scheduler_runs_and_is_deterministic(engine: DiffusionInpaintEngine) -> None:
    image, plan = _image(), engine.plan(_mask())
    outputs = set()
    for name in SCHEDULERS:
        first = engine.inpaint(image, plan, seed=5, scheduler=name, **INPAINT_ARGS).tobytes()
        again = engine.inpaint(image, plan, seed=5, scheduler=name, **INPAINT_ARGS).tobytes()
        assert first == again, name
        outputs.add(first)
    assert len(outputs) > 1  # the scheduler option does change the sampler
    default = engine.inpaint(image, plan, seed=5, **INPAINT_ARGS).tobytes()
    assert (
        default == engine.inpaint(image, plan, seed=5, scheduler="pndm", **INPAINT_ARGS).tobytes()
    )


def test_empty_mask_is_invalid_input(engine: DiffusionInpaintEngine) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        engine.plan(Image.new("L", (W, H), 0))


def test_mask_size_mismatch_is_invalid_input(engine: DiffusionInpaintEngine) -> None:
    plan = engine.plan(Image.new("L", (W + 8, H), 255))
    with pytest.raises(InvalidInput):
        engine.inpaint(_image(), plan, seed=0, **INPAINT_ARGS)


def test_too_few_effective_steps_is_invalid_input(engine: DiffusionInpaintEngine) -> None:
    args = {**INPAINT_ARGS, "steps": 2, "strength": 0.3}
    with pytest.raises(InvalidInput):
        engine.inpaint(_image(), engine.plan(_mask()), seed=0, **args)


def test_prompt_over_the_token_limit_is_invalid_input(engine: DiffusionInpaintEngine) -> None:
    with pytest.raises(InvalidInput, match="tokens"):
        engine.check(prompt="red " * 80, negative_prompt=None, steps=2, strength=1.0)
    engine.check(prompt="the and " * 10, negative_prompt="the " * 30, steps=2, strength=1.0)


def test_plan_works_at_native_size_around_the_mask(engine: DiffusionInpaintEngine) -> None:
    mask = Image.new("L", (1000, 700), 0)
    mask.paste(255, (600, 300, 640, 330))
    plan = engine.plan(mask)
    left, top, right, bottom = plan.box
    assert left <= 600 and top <= 300 and right >= 640 and bottom >= 330
    assert (right - left) * (bottom - top) < 1000 * 700 // 20  # a crop, not the image
    assert max(plan.work_size) == engine.native_size


def test_folder_without_pipeline_is_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match="empty"):
        DiffusionInpaintEngine(empty, CPU)
    with pytest.raises(ModelUnavailable, match="missing"):
        DiffusionInpaintEngine(tmp_path / "missing", CPU)


def test_folder_without_weights_is_unavailable(weights_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-weights"
    shutil.copytree(weights_dir / "diffusers" / "tiny-sd-inpaint", broken)
    for weights in broken.rglob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelUnavailable, match="no-weights"):
        DiffusionInpaintEngine(broken, CPU)
