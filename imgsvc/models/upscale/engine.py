"""Super-resolution with any spandrel-supported model (Real-ESRGAN, SRVGG, SwinIR, HAT, …).

- Tiles (see `tiling.py`): each tile is run with context and blended into its neighbours with
  feathered weights, and finished rows stream to a sink, so memory is bounded by the tile band.
- Tile size: from free GPU memory on CUDA, `IMGSVC_UPSCALE_TILE` on CPU. A CUDA out-of-memory
  error splits the failing tile in four (down to `TILE_FLOOR`) and the smaller size is kept.
- Precision: fp16/bf16 on CUDA; a tile that comes back non-finite or black switches this model to
  fp32 for the rest of the request and for good. On CPUs with native bf16, bf16 only for the
  architectures where it was measured to hold: whole-model for Compact (CPU_BF16_ARCHS), and
  for RRDBNet a mix that keeps the residual stream in fp32 (CPU_MIXED_BF16_ARCHS, see
  mixed_bf16.py). Elsewhere on CPU, fp32 with the 3x3 convolutions as Winograd F(6,3)
  (winograd.py). channels_last; optional torch.compile.
- Alpha: transparent pixels take the colour of the nearest visible pixel before the colour pass
  (so no dark fringe), and alpha runs through the same model as a grey image, kept within the
  input alpha's local range (so transparent areas stay exactly transparent).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

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
# between tiles. RRDBNet (x4plus) and transformers see far: whole vs 64 px tiles differ by 43 dB
# PSNR with 32 px of context and by 51 dB with 48. Compact (SRVGG) sees 17 px.
CONTEXT, BLEND = 48, 16
NEAR_SIGHTED = {"RealESRGAN Compact": (16, 8)}
_GPU_MEMORY_SHARE = 0.5  # of the free memory, for one tile's activations
# Architectures whose bf16 output holds on CPU: measured against fp32 on three real images
# (tests/data car, photo_crop, anime-girl), realesr-animevideov3 (Compact) stays at 53-55 dB
# PSNR, 2-3x faster on AVX512-BF16. RRDBNet (x4plus) wholly in bf16 drops to 46 dB on a photo;
# mixed (dense blocks and tail in bf16, residual stream in fp32) it holds ~50 dB at 1.9-2x.
# Compact takes bf16 only where the Winograd kernels cannot be built: its fused fp32 Winograd
# convolutions are faster still on such a CPU (47 vs 60 ms at 128x128 on a 2-core Zen 4) and
# match fp32 (88 dB).
CPU_BF16_ARCHS = frozenset({"RealESRGAN Compact"})
CPU_MIXED_BF16_ARCHS = frozenset({"ESRGAN"})


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


class Upscaler:
    """A spandrel image model loaded once on the chosen device."""

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
    ) -> None:
        if not path.is_file():
            raise ModelUnavailable(
                f"upscale model {name!r} needs {path}; run `imgsvc weights pull`"
            )
        import torch

        self.name = name
        self._path = path
        self._torch_device = torch.device(device.device)
        self._compile = compile
        self.dtype = torch.float32  # what the model takes as input
        self.precision = "float32"  # how it computes: float32 | bfloat16 | float16 | bf16-mixed
        self.convolutions = "direct"  # how 3x3 convolutions run: direct (oneDNN/cuDNN) | winograd
        half: Any = getattr(torch, device.half_dtype) if device.half_dtype else None
        self._descriptor: Any = self._load(torch.float32)
        self._winograd = device.device == "cpu" and cpu_winograd and not compile
        if self._winograd:
            from imgsvc.models.upscale.cpu import build as winograd_build

            self._winograd = winograd_build.available()  # the kernels built for this CPU
        if half == torch.bfloat16 and self._descriptor.supports_bfloat16:
            self._set_dtype(torch.bfloat16)
        elif half is not None and self._descriptor.supports_half:
            self._set_dtype(torch.float16)
        elif cpu_bf16 and device.device == "cpu" and cpu_has_native_bf16():
            self._use_cpu_bf16()
        if self.precision == "float32":
            self._use_winograd()
        self.scale: int = self._descriptor.scale
        self.architecture: str = self._descriptor.architecture.name
        self.context, self.blend = NEAR_SIGHTED.get(self.architecture, (CONTEXT, BLEND))
        self._cpu_tile = tile
        self._tile_cap = TILE_CEILING  # lowered for good after an out-of-memory retry

    def _load(self, dtype: Any) -> Any:
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader

        descriptor = ModelLoader().load_from_file(self._path)
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose == "FaceSR":
            raise ModelUnavailable(f"{self._path.name} is not a single-image upscaling model")
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ModelUnavailable(f"{self._path.name} is not an RGB model")
        descriptor.to(self._torch_device).to(dtype).eval()
        descriptor.model.to(memory_format=torch.channels_last)
        if self._compile:
            descriptor.model.compile(dynamic=True)  # in place: __call__ runs compiled
        return descriptor

    def _set_dtype(self, dtype: Any) -> None:
        self._descriptor.to(dtype)
        self.dtype = dtype
        self.precision = str(dtype).removeprefix("torch.")

    def _use_cpu_bf16(self) -> None:
        """bf16 for the architectures where it was measured to hold; others stay fp32."""
        import torch

        from imgsvc.models.upscale import mixed_bf16

        architecture = self._descriptor.architecture.name
        if architecture in CPU_BF16_ARCHS:
            if not self._winograd:
                self._set_dtype(torch.bfloat16)
        elif architecture in CPU_MIXED_BF16_ARCHS and mixed_bf16.mix(self._descriptor.model):
            self.precision = "bf16-mixed"

    def _use_winograd(self) -> None:
        """fp32 3x3 convolutions on CPU as Winograd F(6,3), where allowed and the kernels build."""
        from imgsvc.models.upscale.cpu import winograd

        model = self._descriptor.model
        if self._winograd and winograd.convert(model):
            self.convolutions = "winograd"
            winograd.fuse_compact_tail(model)

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
            if self.convolutions == "winograd":
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
        """Run in the current dtype; fall back to fp32 (for good) on a non-finite/black result."""
        import torch

        x = batch.to(self.dtype).contiguous(memory_format=torch.channels_last)
        y = self._descriptor(x).float()
        if self.precision == "float32" or _plausible(batch, y):
            return y
        log.warning(
            "%s: %s output was non-finite or black; using float32", self.name, self.precision
        )
        self._descriptor = self._load(torch.float32)
        self.dtype = torch.float32
        self.precision = "float32"
        self.convolutions = "direct"
        self._use_winograd()  # a CPU model that left bf16 still gets the fast fp32 path
        return self._checked(batch)


def cpu_kind(*, cpu_bf16: bool, cpu_winograd: bool) -> str:
    """How the known models run on this host's CPU, for the measured figures in
    upscale_catalog: "bf16" (native bf16), "fp32-winograd" or "fp32" (oneDNN direct)."""
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
