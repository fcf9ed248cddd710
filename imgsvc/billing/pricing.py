"""Prices in integer credits, computed from what a call does (never floats for money)."""

from __future__ import annotations

from dataclasses import dataclass

_MP = 1_000_000


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PriceTable:
    """Default prices. remove.bg charges 1 credit per full-size cut-out; Clipdrop prices upscaling
    per output megapixel; prompt inpainting costs more per step."""

    remove_background: int = 1
    upscale_per_output_mp: int = 1
    erase: int = 1
    inpaint_base: int = 1
    inpaint_per_10_steps: int = 1

    def remove_background_cost(self) -> int:
        return self.remove_background

    def upscale_cost(self, out_width: int, out_height: int) -> int:
        """1 credit per started output megapixel (a 1024x1024 x4 result = 17 MP = 17 credits)."""
        return self.upscale_per_output_mp * max(1, _ceil_div(out_width * out_height, _MP))

    def inpaint_cost(self, *, prompt: bool, steps: int) -> int:
        if not prompt:
            return self.erase
        return self.inpaint_base + self.inpaint_per_10_steps * _ceil_div(steps, 10)


DEFAULT_PRICES = PriceTable()
