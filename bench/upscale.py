"""Upscaling speed: our torch path vs ncnn on the original Real-ESRGAN files, side by side.

CPU (default): the same 128x128 crop of a real photo, the same thread count, the contenders
called in turns (interleaved rounds, at least N and at least 10 s), medians of each, for
  - torch plain: the spandrel model as loaded, fp32, contiguous (the plain baseline),
  - ours direct: `Upscaler.stream` with oneDNN's direct fp32 convolutions (no bf16, no Winograd),
  - ours: `Upscaler.stream` as the service runs it (channels_last, inference mode, tiling; on
    CPUs with native bf16 bf16 / mixed bf16, elsewhere fp32 with Winograd F(6,3) convolutions),
  - ncnn: the `ncnn` package running weights/ncnn/*.param/.bin with its default CPU options.
GPU (`--gpu`, needs CUDA): x4plus on a 512x512 input in fp16 and bf16, megapixels per second
and the share of the H200's ~790 dense fp16/bf16 TFLOP/s this reaches (35.9 MFLOP per px), for
the service's eager path, eager with cudnn.benchmark, one CUDA graph and torch.compile.
`--gpu-smoke` runs that code on the CPU on a tiny input (checks the script before a GPU run;
`bench/gpu_session.sh` is the whole prepared session).

    python bench/upscale.py            # full CPU run (minutes on 2 cores)
    python bench/upscale.py --models realesr-animevideov3   # one model
    python bench/upscale.py --quick    # smoke run, a few seconds
    python bench/upscale.py --gpu      # GPU section
    python bench/upscale.py --gpu-smoke   # the GPU section's code on CPU, a few seconds
    python bench/upscale.py --tiled 384   # ours vs direct fp32 on a larger image, in tiles
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale.engine import Upscaler
from imgsvc.models.upscale.tiling import ArraySink

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
PHOTO = REPO / "tests" / "data" / "car.jpg"
NCNN_STEMS = {
    "realesrgan-x4plus": "realesrgan-x4plus",
    "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
    "realesr-animevideov3": "realesr-animevideov3-x4",
}
X4PLUS_FLOP_PER_PIXEL = 35.9e6
H200_TFLOPS = 790.0


MIN_SECONDS = 10.0  # rounds are repeated until the CPU comparison has filled this much time


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median of `runs` calls after one warm-up call (allocator, primitive caches)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(calls: list[Callable[[], object]], runs: int) -> list[list[float]]:
    """Seconds of every call of each contender, the contenders called in turns (one round =
    each call once).

    Side by side in one loop, so every contender meets the same machine: on a shared VM the
    speed of these cores drifts by up to 2x over tens of seconds, which measuring one contender
    after the other turned into 2x swings in the ratios. At least `runs` rounds and at least
    MIN_SECONDS in all (many rounds for fast models), after one warm-up call each.
    """
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    started = time.perf_counter()
    while len(times[0]) < runs or time.perf_counter() - started < MIN_SECONDS:
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return times


def interleaved_medians(calls: list[Callable[[], object]], runs: int) -> tuple[list[float], int]:
    """Median seconds of each contender (see interleaved_times) and how many rounds ran."""
    times = interleaved_times(calls, runs)
    return [statistics.median(t) for t in times], len(times[0])


def per_round(reference: list[float], mine: list[float]) -> str:
    """reference / mine round by round: median [quartiles]. Each round's contenders ran within
    a second of each other, so this ratio holds through the machine's slow and fast spells."""
    ratios = [r / m for r, m in zip(reference, mine, strict=True)]
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}x"
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return f"{median:.2f}x [{q1:.2f}-{q3:.2f}]"


def crop(size: int) -> Image.Image:
    return Image.open(PHOTO).convert("RGB").crop((100, 100, 100 + size, 100 + size))


def torch_plain(name: str, img: Image.Image) -> Callable[[], object]:
    from spandrel import ModelLoader

    model = ModelLoader().load_from_file(WEIGHTS / "upscale" / f"{name}.safetensors").model
    model = model.eval().float()
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0

    def call() -> object:
        with torch.no_grad():
            return model(x)

    return call


def ours(
    name: str, img: Image.Image, *, compile: bool = False, fast: bool = True
) -> tuple[Callable[[], np.ndarray], str]:
    """The service's path (`Upscaler.stream` to uint8 rows) and how it computes; `fast=False`
    turns bf16 and Winograd off (oneDNN's direct fp32 convolutions)."""
    path = WEIGHTS / "upscale" / f"{name}.safetensors"
    spec = DeviceSpec("cpu", None)
    up = Upscaler(name, path, spec, tile=256, compile=compile, cpu_bf16=fast, cpu_winograd=fast)
    how = up.precision if up.convolutions == "direct" else f"{up.precision}, {up.convolutions}"
    print(f"  ({name}: runs in {how}, compile={compile})", flush=True)

    def call() -> np.ndarray:
        w, h = up.native_size(img.size)
        sink = ArraySink(h, w, 3)
        up.stream(img, sink)
        return sink.array

    return call, how


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ncnn_run(name: str, img: Image.Image, threads: int) -> Callable[[], object]:
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    stem = NCNN_STEMS[name]
    assert net.load_param(str(WEIGHTS / "ncnn" / f"{stem}.param")) == 0
    assert net.load_model(str(WEIGHTS / "ncnn" / f"{stem}.bin")) == 0
    x = np.ascontiguousarray((np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1))

    def call() -> object:
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(x))
        ret, out = extractor.extract("output")
        assert ret == 0
        return np.array(out)

    return call


def cpu(models: list[str], size: int, runs: int, threads: int, *, with_compile: bool) -> None:
    torch.set_num_threads(threads)
    img = crop(size)
    mp = size * size / 1e6
    print(
        f"CPU, {threads} threads, {size}x{size} input, medians of >= {runs} interleaved rounds "
        f"filling >= {MIN_SECONDS:g} s (torch {torch.__version__})"
    )
    print(
        "| model | torch plain fp32 | ours direct fp32 | ours | ours vs direct (PSNR) "
        "| direct + torch.compile | ncnn | ours vs ncnn | per round "
        "| ours s per input MP | rounds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        fp32_call, _ = ours(name, img, fast=False)
        mine_call, precision = ours(name, img)
        quality = psnr(fp32_call(), mine_call())
        calls = [
            torch_plain(name, img),
            fp32_call,
            mine_call,
            ours(name, img, compile=with_compile, fast=False)[0],
            ncnn_run(name, img, threads),
        ]
        times = interleaved_times(calls, runs)
        plain, fp32, mine, compiled, reference = (statistics.median(t) for t in times)
        print(
            f"| {name} | {plain:.3f} s | {fp32:.3f} s | {mine:.3f} s ({precision}) "
            f"| {quality:.1f} dB | {compiled:.3f} s | {reference:.3f} s "
            f"| {reference / mine:.2f}x | {per_round(times[4], times[2])} | {mine / mp:.1f} "
            f"| {len(times[0])} |",
            flush=True,
        )


def tiled(models: list[str], size: int, threads: int) -> None:
    """Ours against oneDNN's direct fp32 at the service's tile size (256 px tiles, so a larger
    image runs in several tiles with context), in turns; ncnn is left out (it has no tiling)."""
    torch.set_num_threads(threads)
    img = Image.open(PHOTO).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    print(f"CPU, {threads} threads, {size}x{size} input in 256 px tiles, medians in turns")
    print("| model | ours direct fp32 | ours | speed-up | rounds |")
    print("|---|---|---|---|---|")
    for name in models:
        direct, _ = ours(name, img, fast=False)
        mine, how = ours(name, img)
        (slow, fast), rounds = interleaved_medians([direct, mine], 2)
        print(
            f"| {name} | {slow:.2f} s | {fast:.2f} s ({how}) | {slow / fast:.2f}x | {rounds} |",
            flush=True,
        )


def cuda_graph(up: Upscaler, x: Any) -> Callable[[], object]:
    """The loaded network captured once as a CUDA graph on a static input, replayed per call
    (no per-kernel launch cost; the service does not do this yet)."""
    model = up._descriptor.model
    static_x = x.to(up.dtype).contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(static_x)

    def replay() -> object:
        graph.replay()
        torch.cuda.synchronize()
        return graph

    return replay


def gpu(
    runs: int,
    *,
    device: str = "cuda",
    size: int = 512,
    name: str = "realesrgan-x4plus",
) -> None:
    """x4plus at 512x512 on CUDA: model-pass time, MP/s and share of the H200's peak, for fp16
    and bf16: the service's eager path (and end to end from the PIL image), eager with
    cudnn.benchmark, one CUDA graph, and torch.compile (the service's IMGSVC_TORCH_COMPILE).
    Each variant is measured on its own, so one that fails prints why and the rest still run.
    `device="cpu"` runs the same code on a small input to check the script before a session."""
    on_cuda = device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    where = torch.cuda.get_device_name() if on_cuda else "CPU (smoke run)"
    print(f"{where}, torch {torch.__version__}, {name}, {size}x{size} input, median of {runs}")
    if on_cuda:
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        print(f"CUDA {torch.version.cuda}, cuDNN {cudnn}")
    print(
        "| dtype | variant | time per call | MP/s | TFLOP/s | share of 790 TFLOP/s | first call |"
    )
    print("|---|---|---|---|---|---|---|")
    img = Image.open(PHOTO).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    x: Any = torch.from_numpy(np.array(img)).to(device).permute(2, 0, 1)[None].float() / 255.0
    path = WEIGHTS / "upscale" / f"{name}.safetensors"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    def model_pass(up: Upscaler) -> Callable[[], object]:
        def call() -> object:
            y = up.forward(x)
            sync()
            return y

        return call

    def end_to_end(up: Upscaler) -> Callable[[], object]:
        def call() -> object:
            sink = ArraySink(size * up.scale, size * up.scale, 3)
            up.stream(img, sink, tile=size)
            return sink.array

        return call

    def measure(dtype: str, variant: str, make: Callable[[], Callable[[], object]]) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                call = make()
                call()  # compiles, captures or tunes, once
                setup = time.perf_counter() - started
                seconds = median_seconds(call, runs)
        except Exception as exc:  # noqa: BLE001 (one broken variant must not take the other rows)
            print(f"| {dtype} | {variant} | failed: {type(exc).__name__}: {exc} | | | | |")
            return
        tflops = X4PLUS_FLOP_PER_PIXEL * size * size / seconds / 1e12
        print(
            f"| {dtype} | {variant} | {seconds * 1e3:.1f} ms | {size * size / 1e6 / seconds:.1f} "
            f"| {tflops:.0f} | {tflops / H200_TFLOPS:.1%} | {setup:.1f} s |",
            flush=True,
        )

    def compiled(spec: DeviceSpec) -> Callable[[], object]:
        return model_pass(Upscaler(name, path, spec, tile=size, compile=True, cpu_winograd=False))

    for dtype in ("float16", "bfloat16") if on_cuda else ("bfloat16",):
        spec = DeviceSpec(device, dtype)  # type: ignore[arg-type]
        up = Upscaler(name, path, spec, tile=size, cpu_winograd=False)
        label = f"{dtype} (ran as {up.precision})"
        measure(label, "service, model pass", partial(model_pass, up))
        measure(label, "service, end to end (PIL in, uint8 out)", partial(end_to_end, up))
        if on_cuda:
            measure(label, "one CUDA graph", partial(cuda_graph, up, x))
            torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape once
            measure(label, "eager, cudnn.benchmark", partial(model_pass, up))
            torch.backends.cudnn.benchmark = False
        del up
        measure(label, "torch.compile (IMGSVC_TORCH_COMPILE)", partial(compiled, spec))
        if on_cuda:
            torch.cuda.empty_cache()


def main() -> None:
    global MIN_SECONDS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: animevideov3, 64 px")
    parser.add_argument("--gpu", action="store_true", help="the GPU section (needs CUDA)")
    parser.add_argument(
        "--gpu-smoke", action="store_true", help="the GPU section's code on CPU, tiny input"
    )
    parser.add_argument("--tiled", type=int, metavar="PX", help="ours vs direct at PX x PX")
    parser.add_argument("--models", help="comma-separated subset of " + ",".join(NCNN_STEMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--min-seconds", type=float, default=MIN_SECONDS, help="least time per model, in turns"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    MIN_SECONDS = args.min_seconds
    models = args.models.split(",") if args.models else list(NCNN_STEMS)
    unknown = set(models) - set(NCNN_STEMS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    if args.gpu:
        gpu(max(args.runs, 10))
    elif args.gpu_smoke:
        gpu(1, device="cpu", size=32, name="realesr-animevideov3")
    elif args.tiled:
        tiled(models, args.tiled, args.threads)
    elif args.quick:
        cpu(["realesr-animevideov3"], 64, 1, args.threads, with_compile=False)
    else:
        cpu(models, 128, args.runs, args.threads, with_compile=True)


if __name__ == "__main__":
    main()
