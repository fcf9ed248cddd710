"""The upscale engine in-process: seams, alpha, precision fallback (also from two threads at
once), convolution paths, loading each file once, sizes, tiling, PNG stream."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from imgsvc.errors import InvalidInput
from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale import catalog, mixed_bf16
from imgsvc.models.upscale import engine as engine_module
from imgsvc.models.upscale.cpu import build as winograd_build
from imgsvc.models.upscale.engine import Upscaler, expected_convolution_path, output_size
from imgsvc.models.upscale.tiling import ArraySink, FeatherBlender, tile_jobs
from imgsvc.png_stream import PngStreamWriter
from imgsvc.weights.versions import weights_version
from tests.upscale_helpers import LOGO_COLOUR, NATIVE_BF16, logo, psnr, save_tiny_compact
from tests.utils import DATA

CPU = DeviceSpec("cpu", None)
PULLED = ["realesr-animevideov3", "realesrgan-x4plus-anime", "realesrgan-x4plus"]
pytestmark = pytest.mark.usefixtures("two_torch_threads")


def engine(weights: Path, name: str, tile: int = 256) -> Upscaler:
    return Upscaler(name, weights / "upscale" / f"{name}.safetensors", CPU, tile=tile)


def run(up: Upscaler, img: Image.Image, tile: int) -> np.ndarray:
    w, h = up.native_size(img.size)
    sink = ArraySink(h, w, 4 if img.mode == "RGBA" else 3)
    up.stream(img, sink, tile=tile)
    return sink.array


@pytest.mark.parametrize("name", ["realesr-animevideov3", "realesrgan-x4plus"])
def test_tiles_leave_no_seam(repo_weights: Path, name: str) -> None:
    """The same 256x256 photo whole and in 64 px tiles: PSNR >= 45 dB."""
    photo = Image.open(DATA / "car.jpg").convert("RGB").crop((100, 50, 356, 306))
    up = engine(repo_weights, name)
    whole = run(up, photo, tile=256)
    tiled = run(up, photo, tile=64)
    assert whole.shape == tiled.shape == (1024, 1024, 3)
    value = psnr(whole, tiled)
    print(f"{name}: whole vs 64 px tiles PSNR {value:.1f} dB")
    assert value >= 45


def test_blending_weights_sum_to_one() -> None:
    """Constant tile outputs blend to exactly that constant: the ramps are a partition of 1."""
    sink = ArraySink(4 * 150, 4 * 203, 1)
    blender = FeatherBlender(150, 203, 1, scale=4, blend=8, sink=sink)
    jobs = tile_jobs(150, 203, 48, 16, 8)
    blender.run(jobs, lambda j: np.full((4 * (j.y.hi - j.y.lo), 4 * (j.x.hi - j.x.lo), 1), 77.0))
    assert (sink.array == 77).all()


def test_rgba_logo_stays_transparent_without_dark_fringe(repo_weights: Path) -> None:
    img = logo(96)
    out = np.asarray(engine(repo_weights, "realesr-animevideov3").upscale(img, (384, 384)))
    assert out.shape == (384, 384, 4)
    alpha_in = np.asarray(img)[..., 3]
    # fully transparent in the input and more than 2 input px from any visible pixel
    near = cv2.dilate((alpha_in > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    far = np.kron(near == 0, np.ones((4, 4), dtype=bool))
    assert far.sum() > 10_000
    assert (out[..., 3][far] == 0).all()
    edge = (out[..., 3] > 0) & (out[..., 3] < 255)
    assert edge.sum() > 300
    mean = out[..., :3][edge].astype(float).mean(axis=0)
    print("edge colour", mean, "logo", LOGO_COLOUR)
    colour = np.array(LOGO_COLOUR, dtype=float)
    # no dark fringe: within 10 % of the logo colour (as a vector), each channel within 10 %
    # of full scale; a fringe from black transparent pixels would pull all three down together
    assert np.linalg.norm(mean - colour) <= 0.1 * np.linalg.norm(colour)
    assert np.all(np.abs(mean - colour) <= 0.1 * 255)
    assert mean.sum() >= 0.9 * colour.sum()


def test_fp16_overflow_falls_back_to_fp32_for_good(tmp_path: Path) -> None:
    """A model whose fp16 activations overflow (NaN) is switched to fp32 and stays there."""
    path = save_tiny_compact(tmp_path / "hot.pth", gain=3000.0)
    up = Upscaler("hot", path, DeviceSpec("cpu", "float16"), tile=32)
    assert (up.dtype, up.convolution_path) == (torch.float16, "onednn-fp16")
    img = Image.open(DATA / "photo_crop.png").convert("RGB")
    out = run(up, img, tile=32)
    assert up.dtype == torch.float32
    assert up.convolution_path == "onednn-fp32"  # its 8-channel convolutions stay direct
    assert out.shape == (192, 256, 3) and out.max() > 0


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The files spandrel loads from now on; nothing described before counts."""
    from spandrel import ModelLoader

    loads: list[Path] = []
    original = ModelLoader.load_from_file

    def load_from_file(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(Path(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ModelLoader, "load_from_file", load_from_file)
    monkeypatch.setattr(catalog, "_described", {})
    yield loads


def test_implausible_output_from_two_threads_reloads_fp32_once(
    repo_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two calls see a bad bf16 output at the same moment: one fp32 reload, one final state,
    and both calls give the fp32 result (neither pairs the new model with the old dtype)."""
    path = repo_weights / "upscale" / "realesr-animevideov3.safetensors"
    up = Upscaler("v3", path, DeviceSpec("cpu", "bfloat16"), tile=64)
    exact = Upscaler("v3", path, CPU, tile=64, cpu_bf16=False)
    assert (up.precision, up.convolution_path) == ("bfloat16", "onednn-bf16")
    both_checked = threading.Barrier(2, timeout=60)

    def implausible(x: Any, y: Any) -> bool:
        both_checked.wait()  # neither thread switches before both have seen bf16 fail
        return False

    loads: list[str] = []
    load = Upscaler._load

    def slow_load(self: Upscaler, *args: Any) -> Any:
        loads.append(threading.current_thread().name)
        time.sleep(0.3)
        return load(self, *args)

    monkeypatch.setattr(engine_module, "_plausible", implausible)
    monkeypatch.setattr(Upscaler, "_load", slow_load)
    batch = torch.rand(1, 3, 32, 40)

    def call(_: int) -> torch.Tensor:
        with torch.inference_mode():
            return up.forward(batch)

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(call, range(2)))
    assert len(loads) == 1
    assert (up.dtype, up.precision) == (torch.float32, "float32")
    assert up.convolution_path == exact.convolution_path
    with torch.inference_mode():
        ref = exact.forward(batch)
    for out in outs:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_new_file_is_loaded_once_to_describe_and_serve(
    tmp_path: Path, counted_loads: list[Path]
) -> None:
    """A file the manifest does not list: one spandrel load describes it and becomes the
    engine's model; the description is remembered, the loaded model handed over once."""
    (tmp_path / "upscale").mkdir()
    path = save_tiny_compact(tmp_path / "upscale" / "mine.pth")
    described = catalog.describe(path, tmp_path)
    up = Upscaler(described.name, path, CPU, tile=64, descriptor=catalog.take_loaded(path))
    assert counted_loads == [path]
    assert (described.architecture, described.scale, described.problem) == (
        up.architecture,
        up.scale,
        None,
    )
    assert catalog.take_loaded(path) is None
    assert catalog.describe(path, tmp_path) == described and len(counted_loads) == 1


def test_a_model_loaded_to_describe_is_not_kept_for_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog, "KEEP_LOADED_SECONDS", 0.05)
    path = save_tiny_compact(tmp_path / "mine.pth")
    assert catalog.describe(path, tmp_path).problem is None
    time.sleep(0.5)
    assert catalog.take_loaded(path) is None


def test_a_file_spandrel_cannot_load_is_described_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a model")
    described = catalog.describe(path, tmp_path)
    assert described.problem and "spandrel cannot load junk.pth" in described.problem
    assert catalog.take_loaded(path) is None


def test_pulled_files_are_described_from_the_manifest(
    repo_weights: Path, counted_loads: list[Path]
) -> None:
    """No spandrel load to list them; what the manifest says is what spandrel finds."""
    from spandrel import ModelLoader

    files = catalog.list_files(repo_weights / "upscale")
    described = {name: catalog.describe(files[name], repo_weights) for name in PULLED}
    assert counted_loads == []
    for name, row in described.items():
        loaded = ModelLoader().load_from_file(files[name])
        assert (row.architecture, row.scale) == (loaded.architecture.name, loaded.scale)
        assert row.problem is None and catalog.problem(loaded, files[name].name) is None
        assert row.version == weights_version(repo_weights, files[name])
        assert row.cpu_seconds_per_input_mp("fp32") is not None


def test_convolution_path_is_what_expected_convolution_path_says(repo_weights: Path) -> None:
    """Loaded engines run the path /v1/models announces for rows not loaded yet (from the
    manifest's description, without loading), for every setting of the CPU switches."""
    winograd = winograd_build.available()
    settings = [
        {"cpu_bf16": True, "cpu_winograd": True},
        {"cpu_bf16": True, "cpu_winograd": False},
        {"cpu_bf16": False, "cpu_winograd": True},
        {"cpu_bf16": False, "cpu_winograd": False},
    ]
    seen = {}
    for name in ["realesr-animevideov3", "realesrgan-x4plus-anime"]:
        path = repo_weights / "upscale" / f"{name}.safetensors"
        architecture = catalog.describe(path, repo_weights).architecture
        for switches in settings:
            up = Upscaler(name, path, CPU, tile=64, **switches)
            expected = expected_convolution_path(architecture, CPU, compile=False, **switches)
            assert up.convolution_path == expected, (name, switches)
            seen[name, switches["cpu_bf16"], switches["cpu_winograd"]] = expected
    fp32 = "winograd-fp32" if winograd else "onednn-fp32"
    assert seen["realesr-animevideov3", False, True] == fp32
    assert seen["realesr-animevideov3", False, False] == "onednn-fp32"
    assert seen["realesrgan-x4plus-anime", False, False] == "onednn-fp32"
    if NATIVE_BF16:
        assert seen["realesr-animevideov3", True, True] == fp32
        assert seen["realesr-animevideov3", True, False] == "onednn-bf16"
        assert seen["realesrgan-x4plus-anime", True, False] == "mixed-bf16"


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is used only on CPUs with native bf16")
def test_convolution_paths_of_the_default_models_on_this_cpu(repo_weights: Path) -> None:
    if not winograd_build.available():
        pytest.skip("no C compiler: the kernels cannot be built")
    paths = {name: engine(repo_weights, name).convolution_path for name in PULLED[::2]}
    assert paths == {"realesr-animevideov3": "winograd-fp32", "realesrgan-x4plus": "mixed-bf16"}
    for name, path_name in paths.items():
        architecture = catalog.describe(
            repo_weights / "upscale" / f"{name}.safetensors", repo_weights
        ).architecture
        assert path_name == expected_convolution_path(
            architecture, CPU, cpu_bf16=True, cpu_winograd=True, compile=False
        )


def test_cuda_paths_follow_the_device() -> None:
    args = {"cpu_bf16": True, "cpu_winograd": True, "compile": False}
    no_half = {"supports_half": False, "supports_bfloat16": False}
    for cuda, path_name in [
        (DeviceSpec("cuda", "float16"), "cuda-fp16"),
        (DeviceSpec("cuda", "bfloat16"), "cuda-bf16"),
    ]:
        assert expected_convolution_path("ESRGAN", cuda, **args) == path_name
        assert expected_convolution_path("ESRGAN", cuda, **args, **no_half) == "cuda-fp32"
    assert expected_convolution_path(None, DeviceSpec("cuda", None), **args) == "cuda-fp32"


def test_split_forward_matches_one_pass(repo_weights: Path) -> None:
    """The out-of-memory retry (quartered tiles with context) gives the same image."""
    up = engine(repo_weights, "realesr-animevideov3")
    rgb = np.asarray(Image.open(DATA / "photo_crop.png").convert("RGB"))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        one = up.forward(x)
        split = up.split_forward(x, 48)
    assert one.shape == split.shape == (1, 3, 384, 512)
    assert psnr(one.numpy() * 255, split.numpy() * 255) >= 50


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is used only on CPUs with native bf16")
def test_compact_prefers_winograd_to_bf16(repo_weights: Path) -> None:
    """On a native-bf16 CPU Compact runs fp32 Winograd (faster there, and exact) where the
    kernels build, and bf16 only without them."""
    path = repo_weights / "upscale" / "realesr-animevideov3.safetensors"
    fast = Upscaler("realesr-animevideov3", path, CPU, tile=256)
    assert (fast.precision, fast.convolutions) == ("float32", "winograd")
    plain = Upscaler("realesr-animevideov3", path, CPU, tile=256, cpu_winograd=False)
    assert (plain.precision, plain.convolutions) == ("bfloat16", "direct")


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is used only on CPUs with native bf16")
@pytest.mark.parametrize("name", ["realesrgan-x4plus", "realesrgan-x4plus-anime"])
def test_rrdbnet_mixed_bf16_stays_close_to_fp32(repo_weights: Path, name: str) -> None:
    """RRDBNet in mixed bf16 (residual stream fp32) vs fp32 on a real photo: >= 48 dB.

    Wholly in bf16 x4plus falls below this floor, so this fails if the fp32 residual path is
    lost.
    """
    photo = Image.open(DATA / "car.jpg").convert("RGB").crop((100, 100, 196, 196))
    mixed = engine(repo_weights, name)
    exact = Upscaler(
        name, repo_weights / "upscale" / f"{name}.safetensors", CPU, tile=256, cpu_bf16=False
    )
    assert (mixed.precision, exact.precision) == ("bf16-mixed", "float32")
    value = psnr(run(mixed, photo, tile=256), run(exact, photo, tile=256))
    print(f"{name}: mixed bf16 vs fp32 PSNR {value:.1f} dB")
    assert 48 <= value < 80  # close to fp32, and not fp32 itself


def test_mixed_bf16_leaves_other_architectures_alone(tmp_path: Path) -> None:
    from spandrel import ModelLoader

    model = ModelLoader().load_from_file(save_tiny_compact(tmp_path / "c.pth")).model
    assert not mixed_bf16.mix(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        ({"scale": None}, (400, 300)),
        ({"scale": 1.5}, (150, 113)),
        ({"scale": 8}, (800, 600)),
        ({"target_width": 250}, (250, 188)),
        ({"target_height": 600}, (800, 600)),
        ({"target_width": 400, "target_height": 1000}, (400, 300)),
    ],
)
def test_output_size(kwargs: dict[str, float | None], size: tuple[int, int]) -> None:
    args: dict[str, float | None] = {"scale": None, "target_width": None, "target_height": None}
    args.update(kwargs)
    assert output_size(100, 75, **args) == size  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"target_width": 50}, {"target_width": 900}, {"scale": 2, "target_width": 200}],
)
def test_output_size_refusals(kwargs: dict[str, int]) -> None:
    args: dict[str, int | None] = {"scale": None, "target_width": None, "target_height": None}
    args.update(kwargs)
    with pytest.raises(InvalidInput):
        output_size(100, 75, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_stream_round_trips(channels: int) -> None:
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (37, 23, channels), dtype=np.uint8)
    buf = io.BytesIO()
    writer = PngStreamWriter(buf, 23, 37, channels)
    for start in (0, 5, 6, 30):
        writer.write(pixels[start : {0: 5, 5: 6, 6: 30, 30: 37}[start]])
    writer.close()
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert np.array_equal(back.reshape(pixels.shape), pixels)
