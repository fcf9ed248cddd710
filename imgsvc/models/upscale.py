"""Super-resolution with any spandrel-supported model (Real-ESRGAN, SRVGG, SwinIR, …).

The image is processed in overlapping tiles: each tile is run with `pad` pixels of context on
every side and only its centre is kept, so memory is bounded by the tile size and there is no
seam. Alpha is resized separately (colour is never darkened by transparent pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceSpec


class Upscaler:
    """A spandrel image model loaded once on the chosen device."""

    def __init__(self, name: str, path: Path, device: DeviceSpec, *, tile: int, pad: int = 16):
        if not path.is_file():
            raise ModelUnavailable(
                f"upscale model {name!r} needs {path}; run `imgsvc weights pull`"
            )
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader

        descriptor = ModelLoader().load_from_file(path)
        if not isinstance(descriptor, ImageModelDescriptor):
            raise ModelUnavailable(f"{path.name} is not a single-image restoration model")
        descriptor.to(torch.device(device.device)).eval()
        self.dtype = torch.float32
        if device.half_dtype == "bfloat16" and descriptor.supports_bfloat16:
            self.dtype = torch.bfloat16
        elif device.half_dtype is not None and descriptor.supports_half:
            self.dtype = torch.float16
        descriptor.to(self.dtype)
        self._descriptor: Any = descriptor
        self._device = torch.device(device.device)
        self.name = name
        self.scale: int = descriptor.scale
        self.architecture: str = descriptor.architecture.name
        self.tile = tile
        self.pad = pad

    def upscale(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Run the model's native scale, then resize to exactly `size` (Lanczos) if it differs."""
        rgb = np.asarray(img.convert("RGB"))
        out = self._run_tiled(rgb)
        result = Image.fromarray(out, "RGB")
        if result.size != size:
            result = result.resize(size, Image.Resampling.LANCZOS)
        if img.mode == "RGBA":
            result.putalpha(img.getchannel("A").resize(size, Image.Resampling.LANCZOS))
        return result

    def _run_tiled(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        h, w, _ = rgb.shape
        s, t, p = self.scale, self.tile, self.pad
        out = np.empty((h * s, w * s, 3), dtype=np.uint8)
        with torch.inference_mode():
            for y0 in range(0, h, t):
                for x0 in range(0, w, t):
                    y1, x1 = min(y0 + t, h), min(x0 + t, w)
                    py0, px0 = max(y0 - p, 0), max(x0 - p, 0)
                    py1, px1 = min(y1 + p, h), min(x1 + p, w)
                    tile = torch.from_numpy(np.ascontiguousarray(rgb[py0:py1, px0:px1]))
                    x = tile.to(self._device).permute(2, 0, 1)[None].to(self.dtype) / 255.0
                    y = self._descriptor(x)[0].float().clamp_(0, 1)
                    y = (y * 255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                    oy, ox = (y0 - py0) * s, (x0 - px0) * s
                    out[y0 * s : y1 * s, x0 * s : x1 * s] = y[
                        oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
                    ]
        return out
