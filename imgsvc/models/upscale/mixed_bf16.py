"""bf16 for RRDBNet (ESRGAN, Real-ESRGAN x4plus / x4plus-anime) on CPU, without most of its loss.

Run wholly in bf16, x4plus is much faster on an AVX512-BF16 CPU but strays further from fp32
on a photo than we accept: its 23 residual-in-residual blocks add small updates
(`x + 0.2 * f(x)`) to a running feature map, and rounding that map to bf16's 8-bit mantissa
69 times is where most of the error comes from. Here every dense block computes `f(x)` in bf16
(its five convolutions, most of x4plus's FLOPs) but returns `x + 0.2 * f(x)` in fp32, so the
residual stream, the first convolution and the trunk's closing convolution stay fp32; the
upsampling tail (convs at 2x and 4x resolution) runs in bf16 behind one cast. That keeps almost
all of the all-bf16 speed-up and much of fp32's accuracy (figures in BENCHMARKS.md;
`tests/test_upscale_engine.py` checks a PSNR floor against fp32).

The structure is checked first; any other model is left alone (`mix` returns False).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_DENSE_BLOCK = "ResidualDenseBlock_5C"


class _Bf16Segment(nn.Module):
    """Run `inner` in bf16 between two casts: fp32 in, fp32 out."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x.to(torch.bfloat16))
        return out.float()


class _Bf16DenseBlock(nn.Module):
    """spandrel's ResidualDenseBlock_5C with its convolutions in bf16 and `x + 0.2 * f(x)` in
    fp32 (the same operations as its own forward, in the same order)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block.to(torch.bfloat16)

    def forward(self, x32: torch.Tensor) -> torch.Tensor:
        b: Any = self.block
        x = x32.to(torch.bfloat16)
        x1 = b.conv1(x)
        x2 = b.conv2(torch.cat((x, x1), 1))
        if b.conv1x1:
            x2 = x2 + b.conv1x1(x)
        x3 = b.conv3(torch.cat((x, x1, x2), 1))
        x4 = b.conv4(torch.cat((x, x1, x2, x3), 1))
        if b.conv1x1:
            x4 = x4 + x2
        x5 = b.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return torch.add(x32, x5.float(), alpha=0.2)


def mix(model: nn.Module) -> bool:
    """Make a spandrel RRDBNet mixed-precision in place; False (untouched) for anything else."""
    body = getattr(model, "model", None)
    if type(model).__name__ != "RRDBNet" or not isinstance(body, nn.Sequential) or len(body) < 3:
        return False
    trunk = body[1]
    if type(trunk).__name__ != "ShortcutBlock":
        return False
    blocks = [
        (parent, name)
        for parent in trunk.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == _DENSE_BLOCK
    ]
    if not blocks or not all(_has_dense_layout(getattr(p, n)) for p, n in blocks):
        return False
    for parent, name in blocks:
        setattr(parent, name, _Bf16DenseBlock(getattr(parent, name)))
    tail = nn.Sequential(*list(body)[2:])
    model.model = nn.Sequential(body[0], trunk, _Bf16Segment(tail))
    return True


def _has_dense_layout(block: nn.Module) -> bool:
    return all(hasattr(block, f"conv{i}") for i in range(1, 6)) and hasattr(block, "conv1x1")
