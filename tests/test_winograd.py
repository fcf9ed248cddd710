"""Winograd F(6,3) convolutions: against torch's direct convolution, on every shape and
activation it takes, inside real models, and in the service's upscaler (plus its fallbacks: no
compiler, buffers the C code must not see, a C function that fails)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale.cpu import build as winograd_build
from imgsvc.models.upscale.cpu import winograd
from imgsvc.models.upscale.engine import Upscaler
from imgsvc.models.upscale.tiling import ArraySink
from tests.upscale_helpers import has_c_compiler, psnr
from tests.utils import DATA, REPO

HAS_COMPILER = has_c_compiler()
pytestmark = [
    pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernels cannot be built"),
    pytest.mark.usefixtures("two_torch_threads"),
]


def test_kernels_build_where_there_is_a_compiler() -> None:
    """A compiler that cannot build the kernels is a defect here, not a reason to skip."""
    assert winograd_build.available(), winograd_build._failure


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 agreement: F(6,3) rounds differently from a direct sum, by a few ulps of the scale."""
    assert out.shape == ref.shape
    scale = float(ref.abs().max()) or 1.0
    error = float((out - ref).abs().max()) / scale
    assert error < 2e-5, error


ACTIVATIONS = {
    "none": lambda c: None,
    "relu": lambda c: nn.ReLU(),
    "leaky": lambda c: nn.LeakyReLU(0.2),
    "prelu1": lambda c: nn.PReLU(1, init=0.1),
    "prelu": lambda c: nn.PReLU(c),
}


@pytest.fixture(params=["fused", "bands"])
def conv_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A plain convolution runs fused (wino_conv) by default; the bands (transforms and one
    bmm per band) remain for dense blocks and as the fallback: both must compute the same."""
    monkeypatch.setattr(winograd, "FUSED", request.param == "fused")
    return str(request.param)


@pytest.mark.usefixtures("conv_path")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(
    ("n", "cin", "cout", "h", "w"),
    [
        (1, 64, 64, 128, 128),  # whole tiles (128 = 21*6 + 2)
        (2, 3, 16, 13, 1),  # one column, 3 input channels, a batch
        (1, 192, 32, 6, 12),  # exact multiples of the tile
        (1, 20, 17, 7, 29),  # channel counts that are no multiple of the vector width
        (1, 16, 48, 1, 1),  # a single pixel: all padding
    ],
)
def test_matches_direct_convolution(
    activation: str, n: int, cin: int, cout: int, h: int, w: int
) -> None:
    torch.manual_seed(cin * cout + h)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    act = ACTIVATIONS[activation](cout)
    if isinstance(act, nn.PReLU):
        act.weight.data.uniform_(-0.5, 0.5)  # negative slopes too
    x = torch.randn(n, cin, h, w)
    with torch.inference_mode():
        ref = conv(x) if act is None else act(conv(x))
        fused = winograd.WinogradConv2d(conv, act)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = fused(x.contiguous(memory_format=layout))
            close(out, ref)
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("band_bytes", [1, 64 * 4 * 9 * 24 * 2])  # one tile row; two
def test_bands_of_tile_rows_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, band_bytes: int
) -> None:
    """Large images run in bands of tile rows; a band may end inside an image of a batch."""
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    conv, act = nn.Conv2d(24, 16, 3, padding=1), nn.LeakyReLU(0.1)
    x = torch.randn(2, 24, 31, 50)  # 6 tile rows per image, 9 tiles per row
    with torch.inference_mode():
        close(winograd.WinogradConv2d(conv, act)(x), act(conv(x)))


@pytest.mark.parametrize("chunk", [1, 5, 32])
@pytest.mark.parametrize("own_products", [True, False])
def test_fused_chunks_and_products(
    monkeypatch: pytest.MonkeyPatch, chunk: int, own_products: bool
) -> None:
    """wino_conv: any chunk of tiles (the last one short, a chunk across two images of a
    batch), products in its own kernel or, for output channels off its vector width, MKL."""
    width = winograd_build.library().wino_vector_width()
    cout = 2 * width if own_products else width + 4
    if not own_products and winograd_build.blas() is None:
        pytest.skip("torch without MKL: such convolutions run in bands")
    monkeypatch.setattr(winograd, "CHUNK_TILES", chunk)
    conv, act = nn.Conv2d(24, cout, 3, padding=1), nn.PReLU(cout, 0.3)
    fused = winograd.WinogradConv2d(conv, act)
    assert fused.fusable()
    x = torch.randn(2, 24, 23, 40)  # 4 x 7 tiles per image: 56 tiles, no multiple of 5 or 32
    with torch.inference_mode():
        close(fused(x), act(conv(x)))


def test_fused_runs_without_mkl_where_its_kernel_multiplies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch builds without MKL (arm64, macOS): our products alone; off-width channel counts
    fall back to the bands."""
    monkeypatch.setattr(winograd_build, "_blas", None)
    width = winograd_build.library().wino_vector_width()
    assert winograd.WinogradConv2d(nn.Conv2d(16, width, 3, padding=1)).fusable()
    odd = winograd.WinogradConv2d(nn.Conv2d(16, width + 1, 3, padding=1))
    assert not odd.fusable()
    x = torch.randn(1, 16, 20, 20)
    with torch.inference_mode():
        close(odd(x), odd.conv(x))


@pytest.mark.usefixtures("conv_path")
def test_thread_counts_agree() -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 50, 70)
    fused = winograd.WinogradConv2d(conv)
    results = []
    with torch.inference_mode():
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fused(x))
    torch.set_num_threads(2)
    for out in results[1:]:
        close(out, results[0])


def test_other_inputs_run_the_original_modules() -> None:
    """bf16, autograd: the module computes exactly what conv + activation compute."""
    conv, act = nn.Conv2d(16, 16, 3, padding=1), nn.LeakyReLU(0.2)
    fused = winograd.WinogradConv2d(conv, act)
    x = torch.randn(1, 16, 9, 9)
    assert torch.equal(fused(x), act(conv(x)))  # grad enabled
    with torch.inference_mode():
        xb, cb = x.bfloat16(), nn.Conv2d(16, 16, 3, padding=1).bfloat16()
        assert torch.equal(winograd.WinogradConv2d(cb, act)(xb), act(cb(xb)))


def test_convert_swaps_only_what_it_can_compute() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),  # swapped, its PReLU fused
        nn.PReLU(32),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),  # stride 2: kept
        nn.Conv2d(32, 32, 3, padding=2, dilation=2),  # dilated: kept
        nn.Conv2d(32, 32, 3, padding=1, groups=2),  # grouped: kept
        nn.Conv2d(32, 32, 1),  # 1x1: kept
        nn.Conv2d(32, 8, 3, padding=1),  # 8 outputs: kept (below MIN_CHANNELS)
        nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),  # not zero padding: kept
        nn.Conv2d(16, 16, 3, padding=1),  # swapped, no activation after it
        nn.Tanh(),
    ).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.inference_mode():
        ref = model(x)
        assert winograd.convert(model) == 2
        kinds = [type(m).__name__ for m in model]
        assert kinds[:2] == ["WinogradConv2d", "Identity"]
        assert kinds[2:8] == ["Conv2d"] * 6 and kinds[8] == "WinogradConv2d"
        close(model(x), ref)


def test_rrdbnet_dense_blocks_run_in_the_transformed_domain() -> None:
    """ESRGAN's dense blocks become WinogradDenseBlock (concatenation in the Winograd domain,
    residual fused) and the whole network still computes what it computed."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(1)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=24, num_blocks=2, scale=2).eval()
    x = torch.rand(1, 3, 23, 31)
    with torch.inference_mode():
        ref = model(x)
        swapped = winograd.convert(model)
        blocks = [m for m in model.modules() if isinstance(m, winograd.WinogradDenseBlock)]
        assert len(blocks) == 2 * 3 and swapped >= 2 * 3 * 5
        close(model(x), ref)


def test_compact_prelus_fuse_in_its_body() -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(2)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=3, upscale=4).eval()
    for p in model.parameters():  # PReLU weights away from the default 0.25
        if p.dim() == 1:
            p.data.uniform_(-0.3, 0.3)
    x = torch.rand(1, 3, 17, 19)
    with torch.inference_mode():
        ref = model(x)
        assert winograd.convert(model) == 5
        assert sum(isinstance(m, nn.PReLU) for m in model.body) == 0  # all fused
        close(model(x), ref)
        assert winograd.fuse_compact_tail(model)  # pixel shuffle + upscaled input in one pass
        out = model(x)
        close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
    close(model(x).detach(), ref)  # with autograd on: the original modules and tail
    assert not winograd.fuse_compact_tail(nn.Sequential(nn.Conv2d(3, 3, 1)))


COMPUTING = ("wino_input", "wino_output", "wino_conv", "shuffle_add")


class FakeLibrary:
    """The loaded kernels with every call recorded, and the functions in `failing` returning
    -1 instead of running."""

    def __init__(self, *failing: str) -> None:
        self.real = winograd_build.library()
        self.failing = set(failing)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        function = getattr(self.real, name)

        def call(*args: Any) -> Any:
            self.calls.append(name)
            return -1 if name in self.failing else function(*args)

        return call


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> FakeLibrary:
    """The kernels as a FakeLibrary (nothing failing yet); no failure logged so far."""
    fake = FakeLibrary()
    monkeypatch.setattr(winograd_build, "library", lambda: fake)
    monkeypatch.setattr(winograd, "_warned", set())
    return fake


def warnings_about(caplog: pytest.LogCaptureFixture, function: str) -> int:
    return sum(function in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize(
    ("failing", "fused"), [("wino_conv", True), ("wino_input", False), ("wino_output", False)]
)
def test_a_failing_kernel_runs_the_torch_modules_and_says_so_once(
    kernels: FakeLibrary,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
    fused: bool,
) -> None:
    monkeypatch.setattr(winograd, "FUSED", fused)
    kernels.failing = {failing}
    conv, act = nn.Conv2d(16, 32, 3, padding=1), nn.PReLU(32, 0.2)
    module = winograd.WinogradConv2d(conv, act)
    x = torch.randn(1, 16, 20, 30)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(module(x), act(conv(x)))
    assert failing in kernels.calls
    assert warnings_about(caplog, failing) == 1  # once per process and kind of failure


def test_each_kind_of_failure_is_said_once(
    kernels: FakeLibrary, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(winograd, "FUSED", False)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    module = winograd.WinogradConv2d(conv)
    x = torch.randn(1, 16, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        for failing in ("wino_input", "wino_output", "wino_input", "wino_output"):
            kernels.failing = {failing}
            assert torch.equal(module(x), conv(x))
    assert [warnings_about(caplog, f) for f in ("wino_input", "wino_output")] == [1, 1]


def test_a_failing_kernel_in_a_dense_block_runs_the_original_block(
    kernels: FakeLibrary, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure after some of its five convolutions ran: the whole block runs in torch."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(4)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2).eval()
    winograd.convert(model)
    block = next(m for m in model.modules() if isinstance(m, winograd.WinogradDenseBlock))
    x = torch.rand(1, 16, 13, 17)
    kernels.failing = {"wino_output"}
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        assert torch.equal(block(x), block.block(x))
    assert kernels.calls[:2] == ["wino_input", "wino_output"]
    assert warnings_about(caplog, "wino_output") == 1


def test_a_failing_compact_tail_runs_the_original_forward(
    kernels: FakeLibrary, caplog: pytest.LogCaptureFixture
) -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(5)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=2, upscale=2).eval()
    x = torch.rand(1, 3, 11, 9)
    with torch.inference_mode():
        winograd.convert(model)
        ref = model(x)  # Winograd body, torch's tail
        assert winograd.fuse_compact_tail(model)
        kernels.failing = {"shuffle_add"}
        with caplog.at_level(logging.WARNING):
            assert torch.equal(model(x), ref)
    assert "shuffle_add" in kernels.calls
    assert warnings_about(caplog, "shuffle_add") == 1


def test_inputs_the_kernels_cannot_take_never_reach_c(kernels: FakeLibrary) -> None:
    """Unbatched (C, H, W) input, which torch's convolution takes, and the wrong channel count
    (torch's own error) run the original modules without any C call."""
    conv = nn.Conv2d(16, 16, 3, padding=1)
    module = winograd.WinogradConv2d(conv, nn.ReLU())
    x = torch.randn(16, 9, 11)
    with torch.inference_mode():
        assert torch.equal(module(x), torch.relu(conv(x)))
        with pytest.raises(RuntimeError, match="channels"):
            module(torch.randn(1, 8, 9, 11))
    assert kernels.calls == []


def test_weights_of_another_dtype_never_reach_c(kernels: FakeLibrary) -> None:
    """A converted module moved to bf16 and fed fp32: torch's dtype error, not its bf16
    buffers read as fp32 by C (only the argument-free vector width is asked)."""
    module = winograd.WinogradConv2d(nn.Conv2d(16, 16, 3, padding=1)).to(torch.bfloat16)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        module(torch.randn(1, 16, 9, 11))
    assert not set(kernels.calls) & set(COMPUTING)


def bad_calls() -> dict[str, Callable[[], None]]:
    """Calls with buffers that are not what the C code assumes, each one thing wrong."""
    nhwc = torch.randn(1, 12, 12, 8)
    v = torch.empty(64, 4, 8)  # the 2 x 2 tiles of nhwc
    conv = winograd.WinogradConv2d(nn.Conv2d(8, 16, 3, padding=1))
    y = torch.empty(1, 12, 12, 16)
    return {
        "not contiguous": lambda: winograd.transform_input(nhwc.transpose(1, 2), v, 0, (0, 2)),
        "v too small": lambda: winograd.transform_input(nhwc, v[:, :3], 0, (0, 2)),
        "channels past v": lambda: winograd.transform_input(nhwc, v, 4, (0, 2)),
        "band past the image": lambda: winograd.transform_input(nhwc, v, 0, (1, 3)),
        "not float32": lambda: winograd.transform_input(nhwc.double(), v, 0, (0, 2)),
        "3-D": lambda: winograd.transform_input(nhwc[0], v, 0, (0, 2)),
        "y of other channels": lambda: conv.finish(v, y[..., :8].contiguous(), (0, 2)),
        "residual of other size": lambda: conv.finish(v, y, (0, 2), y[:, :6], 0.2),
        "fused y too small": lambda: conv.fused(torch.randn(1, 12, 12, 8), y[:, :6]),
    }


@pytest.mark.parametrize("case", sorted(bad_calls()))
def test_buffers_are_checked_before_any_c_call(kernels: FakeLibrary, case: str) -> None:
    with torch.inference_mode(), pytest.raises(winograd.KernelFailure, match="unexpected"):
        bad_calls()[case]()
    assert not set(kernels.calls) & set(COMPUTING)


CHECKED_UNDER_O = """
import torch
from imgsvc.models.upscale.cpu import winograd
nhwc, v = torch.randn(1, 12, 12, 8), torch.empty(64, 1, 8)
try:
    winograd.transform_input(nhwc, v, 0, (0, 2))  # v holds 1 tile of the 4
except winograd.KernelFailure as failure:
    print("refused:", failure)
"""


def test_checks_hold_under_python_optimize() -> None:
    """`python -O` drops asserts; the checks are not asserts, so a bad call is still refused
    (with asserts it wrote past the end of v)."""
    done = subprocess.run(
        [sys.executable, "-O", "-c", CHECKED_UNDER_O],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused: wino_input: unexpected arguments"), done.stdout


def upscale(up: Upscaler, img: Image.Image) -> np.ndarray:
    w, h = up.native_size(img.size)
    sink = ArraySink(h, w, 3)
    up.stream(img, sink)
    return sink.array


@pytest.mark.parametrize("name", ["realesr-animevideov3", "realesrgan-x4plus-anime"])
def test_upscaler_uses_winograd_with_the_same_result(repo_weights: Path, name: str) -> None:
    """The service's CPU fp32 path (the default where there is no native bf16): Winograd,
    within rounding of oneDNN's direct result."""
    path = repo_weights / "upscale" / f"{name}.safetensors"
    cpu = DeviceSpec("cpu", None)
    fast = Upscaler(name, path, cpu, tile=256, cpu_bf16=False)
    direct = Upscaler(name, path, cpu, tile=256, cpu_bf16=False, cpu_winograd=False)
    assert (fast.convolutions, direct.convolutions) == ("winograd", "direct")
    assert fast.precision == direct.precision == "float32"
    photo = Image.open(DATA / "car.jpg").convert("RGB").crop((100, 50, 196, 146))
    a, b = upscale(fast, photo), upscale(direct, photo)
    value, worst = psnr(a, b), int(np.abs(a.astype(int) - b).max())
    print(f"{name}: winograd vs direct PSNR {value:.1f} dB, max diff {worst}")
    assert value >= 60
    assert worst <= 2  # uint8 values: rounding at most


CHILD = """
import json, sys
from pathlib import Path
import torch
from PIL import Image
from imgsvc.models.upscale.cpu import build as winograd_build
from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale.tiling import ArraySink
from imgsvc.models.upscale.engine import Upscaler
up = Upscaler("c", Path(sys.argv[1]), DeviceSpec("cpu", None), tile=64, cpu_bf16=False)
sink = ArraySink(64, 64, 3)
up.stream(Image.new("RGB", (32, 32), (200, 30, 90)), sink)
try:
    winograd_build.build_kernels()
    reason = None
except winograd_build.KernelUnavailable as exc:
    reason = str(exc)
print(json.dumps({"available": winograd_build.available(), "path": up.convolution_path,
                  "mean": float(sink.array.mean()), "reason": reason}))
"""


def test_without_a_compiler_the_service_runs_direct_convolutions(tmp_path: Path) -> None:
    """No cc/gcc/clang on PATH and nothing cached: upscaling still works, on oneDNN."""
    from tests.upscale_helpers import save_tiny_compact

    weights = save_tiny_compact(tmp_path / "tiny.pth")
    env = {
        **os.environ,
        "PATH": str(tmp_path / "empty"),
        "IMGSVC_KERNEL_CACHE": str(tmp_path / "kernels"),
    }
    env.pop("CC", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(weights)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["available"] is False and result["path"] == "onednn-fp32"
    assert result["mean"] > 0
    assert "no C compiler" in result["reason"]  # what `imgsvc kernels build` reports
    assert done.stderr.count("no C compiler") == 1  # said once, in the log


def test_kernels_are_built_explicitly_and_cached_by_source_compiler_and_cpu(
    tmp_path: Path,
) -> None:
    """`build_kernels()` (`imgsvc kernels build`) builds into the cache and says where; the
    second start finds that build, and lazy first use (`library()`) loads the same file."""
    env = {**os.environ, "IMGSVC_KERNEL_CACHE": str(tmp_path)}
    code = (
        "from imgsvc.models.upscale.cpu import build as b; "
        "print(b.build_kernels()); b.library(); print(b.available())"
    )
    printed = []
    for _ in range(2):  # the second start finds the first one's build
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert done.stdout.endswith("True\n"), done.stderr[-2000:]
        printed.append(done.stdout.splitlines()[0])
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("winograd-"), built  # no partial files
    assert printed == [str(built[0])] * 2


@pytest.mark.usefixtures("conv_path")
def test_two_threads_share_a_model() -> None:
    """IMGSVC_CONCURRENCY_UPSCALE > 1 runs one model from several threads: each thread has its
    own transform buffers, so concurrent calls give what sequential calls give."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.PReLU(32), nn.Conv2d(32, 16, 3, padding=1)
    )
    winograd.convert(model)
    inputs = [torch.randn(1, 16, 40 + 7 * i, 50) for i in range(6)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for out, ref in zip(pool.map(run, inputs), expected, strict=True):
                assert torch.equal(out, ref)
