"""Object erase with LaMa (big-lama) through spandrel, when its weights are installed.

`weights/inpaint/big-lama.safetensors` (or `.pt`/`.pth`/`.ckpt`): the official big-lama
generator state dict, which spandrel detects and builds. It works on a crop around the mask
(longer side at most `MAX_SIDE`, padded to a multiple of 8) and pastes back with the blend mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceSpec
from imgsvc.models.inpaint import region
from imgsvc.models.inpaint.erase import plan_at_full_size

NAME = "lama"
FILE_STEM = "big-lama"
SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")
#: LaMa was trained around 256-512 px; crops above this are filled at this size.
MAX_SIDE = 1024


def find_weights(weights_dir: Path) -> Path | None:
    """`weights_dir/inpaint/big-lama.<suffix>`, the first that exists, else None."""
    for suffix in SUFFIXES:
        path = Path(weights_dir) / "inpaint" / f"{FILE_STEM}{suffix}"
        if path.is_file():
            return path
    return None


class LamaEraser:
    """LaMa loaded once; `erase` may be called from several threads (admission bounds them)."""

    name = NAME

    def __init__(self, path: Path, device: DeviceSpec) -> None:
        import torch
        from spandrel import MaskedImageModelDescriptor, ModelLoader

        try:
            descriptor = ModelLoader().load_from_file(path)
        except Exception as exc:  # spandrel raises plain exceptions for unknown/corrupt files
            raise ModelUnavailable(f"cannot load LaMa weights {path}: {exc}") from exc
        if not isinstance(descriptor, MaskedImageModelDescriptor):
            raise ModelUnavailable(
                f"{path.name} is not an inpainting model (spandrel found "
                f"{descriptor.architecture.name})"
            )
        self.dtype = torch.float32
        if device.half_dtype == "bfloat16" and descriptor.supports_bfloat16:
            self.dtype = torch.bfloat16
        self._device = torch.device(device.device)
        descriptor.to(self._device).to(self.dtype).eval()
        self._descriptor: Any = descriptor
        self.path = path

    def plan(self, alpha: Image.Image) -> region.CropPlan:
        return plan_at_full_size(alpha, MAX_SIDE)

    def erase(self, image: Image.Image, plan: region.CropPlan) -> Image.Image:
        import torch

        rgb, hole = region.crop(image, plan)
        w, h = rgb.size
        pad_w, pad_h = (-w) % 8 + max(0, 16 - w), (-h) % 8 + max(0, 16 - h)
        arr = np.pad(np.asarray(rgb), ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
        msk = np.pad(np.asarray(hole), ((0, pad_h), (0, pad_w)), mode="symmetric")
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self._device, self.dtype) / 255.0
        m = (torch.from_numpy(msk)[None, None] > 0).to(self._device, self.dtype)
        with torch.inference_mode():
            y = self._descriptor(x, m)[0].float().clamp_(0, 1)
        out = (y * 255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()[:h, :w]
        return region.paste_back(image, plan, Image.fromarray(np.ascontiguousarray(out), "RGB"))
