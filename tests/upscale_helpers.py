"""Helpers for the upscale tests: a tiny spandrel-loadable model, PSNR, a logo with alpha."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from imgsvc.models.device import cpu_has_native_bf16
from imgsvc.models.upscale.cpu import build

LOGO_COLOUR = (40, 120, 220)
NATIVE_BF16 = cpu_has_native_bf16()


def has_c_compiler() -> bool:
    """Whether this machine has a compiler the CPU kernels can be built with."""
    try:
        build._compiler()
    except build.KernelUnavailable:
        return False
    return True


def save_tiny_compact(path: Path, *, scale: int = 2, gain: float = 1.0) -> Path:
    """A random SRVGGNetCompact (Real-ESRGAN's Compact) state dict saved as a .pth file."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    state = {k: v * gain if k.endswith("weight") else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def logo(size: int = 96) -> Image.Image:
    """A solid-colour shape with anti-aliased edges over full transparency."""
    big = Image.new("RGBA", (size * 4, size * 4), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    fill = (*LOGO_COLOUR, 255)
    draw.ellipse((size * 0.6, size * 0.6, size * 3.3, size * 3.3), fill=fill)
    draw.rectangle((size * 1.6, size * 0.2, size * 2.4, size * 3.8), fill=fill)
    return big.resize((size, size), Image.Resampling.LANCZOS)
