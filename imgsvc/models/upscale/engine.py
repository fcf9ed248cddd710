"""Super-resolution with any spandrel-supported model (Real-ESRGAN, SRVGG, SwinIR, HAT, …).

- Tiles (see `tiling.py`): each tile is run with context and blended into its neighbours with
  feathered weights, and finished rows stream to a sink, so memory is bounded by the tile band.
- Tile size: from free GPU memory on CUDA, `IMGSVC_UPSCALE_TILE` on CPU. A CUDA out-of-memory
  error splits the failing tile in four (down to `TILE_FLOOR`) and the smaller size is kept.
- Precision and convolutions (`convolution_path`, decided by `expected_convolution_path`):
  fp16/bf16 on CUDA; a tile that comes back non-finite or black switches this model to fp32 for
  the rest of the request and for good (once, under a lock, even with concurrent calls). On CPUs
  with native bf16, bf16 only for the architectures where it was measured to hold: whole-model
  for Compact (CPU_BF16_ARCHS), and for RRDBNet a mix that keeps the residual stream in fp32
  (CPU_MIXED_BF16_ARCHS, see mixed_bf16.py). Elsewhere on CPU, fp32 with the 3x3 convolutions
  as Winograd F(6,3) (cpu/winograd.py) where the kernels build, else oneDNN's direct ones.
  channels_last; optional torch.compile.
- Alpha: transparent pixels take the colour of the nearest visible pixel before the colour pass
  (so no dark fringe), and alpha runs through the same model as a grey image, kept within the
  input alpha's local range (so transparent areas stay exactly transparent).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from imgsvc import metrics
from imgsvc.errors import InvalidInput, ModelUnavailable
from imgsvc.models.device import DeviceSpec, cpu_has_native_bf16
from imgsvc.models.upscale.tiling import (
    ArraySink,
    FeatherBlender,
    RowSink,
    TileJob,
    spans,
    tile_jobs,
)

log = logging.getLogger(__name__)

MIN_SCALE, MAX_SCALE = 1.0, 8.0
TILE_FLOOR = 64  # smallest tile an out-of-memory retry may use
TILE_CEILING = 2048
# Input pixels of context around every tile (thrown away) and half-width of the feathered overlap
# between tiles. RRDBNet (x4plus) and transformers see far: tiled results come markedly closer
# to whole-image ones with 48 px of context than with 32 (tests/test_upscale_engine.py checks
# the seams). Compact (SRVGG) sees 17 px.
CONTEXT, BLEND = 48, 16
NEAR_SIGHTED = {"RealESRGAN Compact": (16, 8)}
_GPU_MEMORY_SHARE = 0.5  # of the free memory, for one tile's activations
# Architectures whose bf16 output holds on CPU, measured against fp32 on real images (figures in
# BENCHMARKS.md): Compact wholly in bf16; RRDBNet (x4plus) only mixed (dense blocks and tail in
# bf16, residual stream in fp32; wholly in bf16 it loses too much). Compact takes bf16 only
# where the Winograd kernels cannot be built: its fused fp32 Winograd convolutions are faster
# still on such a CPU, and match fp32.
CPU_BF16_ARCHS = frozenset({"RealESRGAN Compact"})
CPU_MIXED_BF16_ARCHS = frozenset({"ESRGAN"})
# Convolution paths in reduced precision → the dtype the model then takes. "onednn-fp16" only
# runs where a DeviceSpec asks for fp16 on CPU (select_device never does; the tests do).
_REDUCED = {
    "cuda-fp16": "float16",
    "cuda-bf16": "bfloat16",
    "onednn-fp16": "float16",
    "onednn-bf16": "bfloat16",
}


def expected_convolution_path(
    architecture: str | None,
    device: DeviceSpec,
    *,
    cpu_bf16: bool,
    cpu_winograd: bool,
    compile: bool,
    supports_half: bool = True,
    supports_bfloat16: bool = True,
) -> str:
    """How a model of spandrel's `architecture` (None: unknown) runs its convolutions here:
    "winograd-fp32" (CPU fp32, our Winograd kernels), "mixed-bf16" (CPU, RRDBNet's dense blocks
    in bf16), "onednn-bf16" (CPU, whole model in bf16), "onednn-fp32" (CPU, direct fp32), or
    "cuda-fp16", "cuda-bf16", "cuda-fp32". The engine decides with this too, passing what its
    loaded model supports; a model not loaded yet is assumed to support half and bf16 (as
    spandrel's ESRGAN and Compact do). The loaded engine's `convolution_path` is the truth: it
    is fp32 where a model's structure does not fit, and after the non-finite-output fallback.
    """
    backend = "cuda" if device.is_cuda else "onednn"
    if device.half_dtype == "bfloat16" and supports_bfloat16:
        return f"{backend}-bf16"
    if device.half_dtype is not None and supports_half:
        return f"{backend}-fp16"
    fp32 = _fp32_path(device, cpu_winograd=cpu_winograd, compile=compile)
    if device.is_cuda or not (cpu_bf16 and cpu_has_native_bf16()):
        return fp32
    if architecture in CPU_MIXED_BF16_ARCHS:
        return "mixed-bf16"
    if architecture in CPU_BF16_ARCHS and fp32 != "winograd-fp32":
        return "onednn-bf16"
    return fp32


def _fp32_path(device: DeviceSpec, *, cpu_winograd: bool, compile: bool) -> str:
    """fp32: on CPU with the Winograd kernels where allowed (not with torch.compile) and built."""
    if device.is_cuda:
        return "cuda-fp32"
    if cpu_winograd and not compile:
        from imgsvc.models.upscale.cpu import build as winograd_build

        if winograd_build.available():
            return "winograd-fp32"
    return "onednn-fp32"


def output_size(
    width: int,
    height: int,
    *,
    scale: float | None,
    target_width: int | None,
    target_height: int | None,
) -> tuple[int, int]:
    """The exact output size asked for; the factor must lie in [1, 8]. Aspect is kept."""
    if scale is not None and (target_width or target_height):
        raise InvalidInput("send either scale or target_width/target_height, not both")
    if target_width or target_height:
        fx = target_width / width if target_width else math.inf
        fy = target_height / height if target_height else math.inf
        if fx <= fy:
            factor = fx
            size = (int(target_width or 0), _rounded(height * fx))
        else:
            factor = fy
            size = (_rounded(width * fy), int(target_height or 0))
        asked = f"target size {target_width or '-'}x{target_height or '-'}"
    else:
        factor = 4.0 if scale is None else scale
        size = (_rounded(width * factor), _rounded(height * factor))
        asked = f"scale {factor:g}"
    if not MIN_SCALE <= factor <= MAX_SCALE:
        raise InvalidInput(
            f"{asked} means a factor of {factor:.3g} for a {width}x{height} image; "
            f"the factor must be between {MIN_SCALE:g} and {MAX_SCALE:g}"
        )
    return size


def _rounded(pixels: float) -> int:
    return max(1, math.floor(pixels + 0.5))


def bleed_colour(rgba: np.ndarray) -> np.ndarray:
    """RGB where every fully transparent pixel takes the colour of the nearest visible one."""
    rgb = np.ascontiguousarray(rgba[..., :3])
    transparent = rgba[..., 3] == 0
    if not transparent.any() or transparent.all():
        return rgb
    _, labels = cv2.distanceTransformWithLabels(
        transparent.astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    visible = rgb[~transparent]  # raster order, which is the order of the labels
    return np.asarray(visible[labels - 1], dtype=np.uint8)


def planes(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) for RGB, (H, W, 4) with bled colour for RGBA."""
    if img.mode == "RGBA":
        rgba = np.asarray(img)
        return np.dstack([bleed_colour(rgba), rgba[..., 3]])
    return np.asarray(img.convert("RGB"))


@dataclass(frozen=True)
class _Mode:
    """How the engine runs now; replaced whole, so a call that read it once stays consistent."""

    descriptor: Any  # the loaded spandrel model
    dtype: Any  # the torch dtype it takes as input
    precision: str  # how it computes: float32 | bfloat16 | float16 | bf16-mixed
    convolution_path: str  # see expected_convolution_path


class Upscaler:
    """A spandrel image model loaded once on the chosen device.

    `descriptor`: a spandrel model already loaded from `path` (on CPU, float32; e.g.
    `catalog.take_loaded(path)`), which the engine then owns, instead of loading the file;
    `path` is still read for the fp32 reload after an implausible reduced-precision output.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        device: DeviceSpec,
        *,
        tile: int,
        compile: bool = False,
        cpu_bf16: bool = True,
        cpu_winograd: bool = True,
        descriptor: Any = None,
    ) -> None:
        if not path.is_file():
            raise ModelUnavailable(
                f"upscale model {name!r} needs {path}; run `imgsvc weights pull`"
            )
        import torch

        self.name = name
        self._path = path
        self._device = device
        self._torch_device = torch.device(device.device)
        self._compile = compile
        self._cpu_winograd = cpu_winograd
        self._lock = threading.Lock()  # held to change the mode or the tile cap
        loaded = self._prepare(self._read() if descriptor is None else descriptor)
        self.scale: int = loaded.scale
        self.architecture: str = loaded.architecture.name
        path_name = expected_convolution_path(
            self.architecture,
            device,
            cpu_bf16=cpu_bf16,
            cpu_winograd=cpu_winograd,
            compile=compile,
            supports_half=loaded.supports_half,
            supports_bfloat16=loaded.supports_bfloat16,
        )
        self._mode = self._enter(loaded, path_name)
        self.context, self.blend = NEAR_SIGHTED.get(self.architecture, (CONTEXT, BLEND))
        self._cpu_tile = tile
        self._tile_cap = TILE_CEILING  # lowered for good after an out-of-memory retry

    @property
    def dtype(self) -> Any:
        """The torch dtype the model takes as input."""
        return self._mode.dtype

    @property
    def precision(self) -> str:
        return self._mode.precision

    @property
    def convolution_path(self) -> str:
        """How the model runs now (see expected_convolution_path)."""
        return self._mode.convolution_path

    @property
    def convolutions(self) -> str:
        """How its 3x3 convolutions run: "winograd" (our kernels) or "direct" (oneDNN/cuDNN)."""
        return "winograd" if self._mode.convolution_path == "winograd-fp32" else "direct"

    @property
    def _descriptor(self) -> Any:  # the loaded model, for bench/upscale.py
        return self._mode.descriptor

    def _read(self) -> Any:
        from spandrel import ModelLoader

        return ModelLoader().load_from_file(self._path)

    def _prepare(self, descriptor: Any) -> Any:
        """A loaded model checked, then on the device in fp32, channels_last, compiled if asked."""
        import torch

        from imgsvc.models.upscale import catalog

        why = catalog.problem(descriptor, self._path.name)
        if why:
            raise ModelUnavailable(why)
        descriptor.to(self._torch_device).to(torch.float32).eval()
        descriptor.model.to(memory_format=torch.channels_last)
        if self._compile:
            descriptor.model.compile(dynamic=True)  # in place: __call__ runs compiled
        return descriptor

    def _load(self) -> Any:
        return self._prepare(self._read())

    def _enter(self, descriptor: Any, path_name: str) -> _Mode:
        """The prepared fp32 `descriptor` set up to run as `path_name`; fp32 where the model's
        structure does not fit the bf16 mix."""
        import torch

        from imgsvc.models.upscale import mixed_bf16

        if path_name in _REDUCED:
            dtype = getattr(torch, _REDUCED[path_name])
            descriptor.to(dtype)
            return _Mode(descriptor, dtype, _REDUCED[path_name], path_name)
        if path_name == "mixed-bf16" and mixed_bf16.mix(descriptor.model):
            return _Mode(descriptor, torch.float32, "bf16-mixed", path_name)
        return self._fp32(descriptor)

    def _fp32(self, descriptor: Any) -> _Mode:
        """fp32, with the 3x3 convolutions as Winograd F(6,3) where allowed and they convert."""
        import torch

        from imgsvc.models.upscale.cpu import winograd

        path_name = _fp32_path(self._device, cpu_winograd=self._cpu_winograd, compile=self._compile)
        if path_name == "winograd-fp32":
            if winograd.convert(descriptor.model):
                winograd.fuse_compact_tail(descriptor.model)
            else:
                path_name = "onednn-fp32"
        return _Mode(descriptor, torch.float32, "float32", path_name)

    # -- public API ------------------------------------------------------------------------
    def native_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * self.scale, size[1] * self.scale

    def tile_size(self) -> int:
        """Input tile edge: from free GPU memory on CUDA, the configured size on CPU."""
        import torch

        if self._torch_device.type != "cuda":
            return min(self._cpu_tile, self._tile_cap)
        free, _ = torch.cuda.mem_get_info(self._torch_device)
        element = torch.finfo(self.dtype).bits // 8
        # RGB + alpha batch; 64-channel feature maps at output resolution dominate.
        per_pixel = 2 * element * (self.scale * self.scale * 64 * 3 + 64 * 16)
        side = int(math.sqrt(free * _GPU_MEMORY_SHARE / per_pixel)) // 16 * 16
        return max(TILE_FLOOR, min(side, self._tile_cap))

    def upscale(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Run the model's native scale, then resize to exactly `size` (Lanczos) if it differs."""
        w, h = self.native_size(img.size)
        sink = ArraySink(h, w, 4 if img.mode == "RGBA" else 3)
        self.stream(img, sink)
        if img.mode != "RGBA":
            result = Image.fromarray(sink.array, "RGB")
            return result if result.size == size else result.resize(size, Image.Resampling.LANCZOS)
        result = Image.fromarray(sink.array, "RGBA")
        if result.size == size:
            return result
        # resample premultiplied so transparent colour cannot bleed into visible pixels
        return result.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")

    def stream(self, img: Image.Image, sink: RowSink, *, tile: int | None = None) -> None:
        """Upscale at the native scale, streaming uint8 rows (RGB, or RGBA for RGBA) to `sink`."""
        import torch

        data = planes(img)
        h, w, c = data.shape
        tile = tile or self.tile_size()
        blender = FeatherBlender(h, w, c, scale=self.scale, blend=self.blend, sink=sink)
        jobs = tile_jobs(h, w, tile, self.context, self.blend)
        try:
            with torch.inference_mode():
                blender.run(jobs, lambda job: self._tile(data, job))
        finally:
            if self.convolution_path == "winograd-fp32":
                from imgsvc.models.upscale.cpu import winograd

                winograd.release_workspace()  # reused across tiles, not kept between requests

    # -- one tile ------------------------------------------------------------------------------
    def _tile(self, data: np.ndarray, job: TileJob) -> np.ndarray:
        """float32 (rows, cols, C) in [0, 255] for the job's input window."""
        import torch

        crop = np.array(data[job.y.lo : job.y.hi, job.x.lo : job.x.hi])  # a writable copy
        x = torch.from_numpy(crop).to(self._torch_device).permute(2, 0, 1).float() / 255.0
        batch = x[None, :3] if x.shape[0] == 3 else torch.stack([x[:3], x[3:].expand(3, -1, -1)])
        y = self.forward(batch)
        out = y[0] if y.shape[0] == 1 else torch.cat([y[0], self._alpha(x[3:], y[1])])
        result: np.ndarray = (out * 255.0).permute(1, 2, 0).float().cpu().numpy()
        return result

    def _alpha(self, alpha_in: Any, grey_out: Any) -> Any:
        """The model's alpha, kept within the input alpha's range around each pixel (3x3).

        Fully transparent surroundings stay exactly 0 and fully opaque ones exactly 255: the
        model only shapes the edges, it cannot add a halo or holes.
        """
        import torch.nn.functional as F

        a = alpha_in[None]
        low = F.interpolate(-F.max_pool2d(-a, 3, 1, 1), scale_factor=self.scale)[0]
        high = F.interpolate(F.max_pool2d(a, 3, 1, 1), scale_factor=self.scale)[0]
        return grey_out.mean(0, keepdim=True).clamp(low, high)

    def forward(self, batch: Any) -> Any:
        """float32 (N, 3, h, w) in [0, 1] → float32 (N, 3, h*s, w*s); splits on CUDA OOM."""
        import torch

        try:
            return self._checked(batch)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            half = max(batch.shape[-2:]) // 2
            if half < TILE_FLOOR:
                raise
            metrics.OOM_RETRIES.labels(self.name).inc()
            with self._lock:
                self._tile_cap = min(self._tile_cap, half)
            log.warning("%s: out of GPU memory, tiles now at most %d px", self.name, half)
            return self.split_forward(batch, half)

    def split_forward(self, batch: Any, tile: int) -> Any:
        """`forward` on sub-tiles of at most `tile` px (with context), stitched together."""
        import torch

        n, c, h, w = batch.shape
        s = self.scale
        out = torch.empty((n, c, h * s, w * s), dtype=torch.float32, device=batch.device)
        for ys in spans(h, tile, self.context, 0):
            for xs in spans(w, tile, self.context, 0):
                part = self.forward(batch[:, :, ys.lo : ys.hi, xs.lo : xs.hi])
                oy, ox = (ys.start - ys.lo) * s, (xs.start - xs.lo) * s
                out[:, :, ys.start * s : ys.stop * s, xs.start * s : xs.stop * s] = part[
                    :, :, oy : oy + (ys.stop - ys.start) * s, ox : ox + (xs.stop - xs.start) * s
                ]
        return out

    def _checked(self, batch: Any) -> Any:
        """Run in the current mode; fall back to fp32 (for good) on a non-finite/black result."""
        import torch

        mode = self._mode  # read once: a switch meanwhile cannot pair one model with another dtype
        x = batch.to(mode.dtype).contiguous(memory_format=torch.channels_last)
        y = mode.descriptor(x).float()
        if mode.precision == "float32" or _plausible(batch, y):
            return y
        self._fall_back_to_fp32(mode)
        return self._checked(batch)

    def _fall_back_to_fp32(self, failed: _Mode) -> None:
        """Reload in fp32 for good, once: a thread that saw `failed` after another thread had
        switched already just runs again in the new mode."""
        with self._lock:
            if self._mode is not failed:
                return
            log.warning(
                "%s: %s output was non-finite or black; using float32", self.name, failed.precision
            )
            self._mode = self._fp32(self._load())  # a CPU model that left bf16 gets Winograd


def cpu_kind(*, cpu_bf16: bool, cpu_winograd: bool) -> str:
    """How the known models run on this host's CPU, for the measured figures of
    catalog.CPU_SECONDS_PER_INPUT_MP: "bf16" (native bf16), "fp32-winograd" or "fp32" (oneDNN
    direct)."""
    from imgsvc.models.upscale.cpu import build as winograd_build

    if cpu_bf16 and cpu_has_native_bf16():
        return "bf16"
    return "fp32-winograd" if cpu_winograd and winograd_build.available() else "fp32"


def _plausible(x: Any, y: Any) -> bool:
    """False for NaN/inf output, or black output from an input that is not dark."""
    import torch

    if not bool(torch.isfinite(y).all()):
        return False
    return not (float(y.amax()) < 1.0 / 255.0 and float(x.amax()) > 16.0 / 255.0)
