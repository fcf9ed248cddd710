"""Prices in integer credits from a TOML table, computed from what a call does.

Integer arithmetic only: per-megapixel prices are applied as ceil(price * pixels / 1e6).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from imgsvc.billing.limits import MAX_PRICE
from imgsvc.errors import ConfigurationError

_MP = 1_000_000
BackgroundSize = Literal["preview", "full"]


class PriceTableError(ConfigurationError):
    code = "price_table_invalid"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PriceTable:
    """One version of the prices; `version` is stored on every charge made with it."""

    version: str
    remove_background_full: int
    remove_background_preview: int
    upscale_per_output_megapixel: int
    upscale_minimum: int
    inpaint_erase: int
    inpaint_prompt_base: int
    inpaint_per_step_megapixel: int

    def remove_background_cost(self, size: BackgroundSize = "full") -> int:
        return self.remove_background_full if size == "full" else self.remove_background_preview

    def upscale_cost(self, out_width: int, out_height: int) -> int:
        pixels = out_width * out_height
        return max(self.upscale_minimum, _ceil_div(self.upscale_per_output_megapixel * pixels, _MP))

    def inpaint_cost(self, *, prompt: bool, steps: int, work_pixels: int) -> int:
        """Erase is flat; prompt inpainting grows with steps x the pixels the model works on."""
        if not prompt:
            return self.inpaint_erase
        work = _ceil_div(self.inpaint_per_step_megapixel * steps * work_pixels, _MP)
        return self.inpaint_prompt_base + work


def load_prices(path: Path | None = None) -> PriceTable:
    """Read a price table (the shipped default when `path` is None); refuse a malformed one."""
    try:
        if path is None:
            text = resources.files("imgsvc.billing").joinpath("prices.toml").read_text()
        else:
            text = path.read_text()
        data = tomllib.loads(text)
        table = PriceTable(
            version=str(data["version"]),
            remove_background_full=data["remove_background"]["full"],
            remove_background_preview=data["remove_background"]["preview"],
            upscale_per_output_megapixel=data["upscale"]["per_output_megapixel"],
            upscale_minimum=data["upscale"]["minimum"],
            inpaint_erase=data["inpaint"]["erase"],
            inpaint_prompt_base=data["inpaint"]["prompt_base"],
            inpaint_per_step_megapixel=data["inpaint"]["per_step_megapixel"],
        )
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise PriceTableError(f"price table {path or '(default)'} is unreadable: {exc}") from exc
    for name, value in vars(table).items():
        if name != "version" and (not isinstance(value, int) or not 0 <= value <= MAX_PRICE):
            raise PriceTableError(f"price {name} must be an integer 0 to {MAX_PRICE}: {value!r}")
    return table
