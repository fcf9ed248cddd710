"""What every operation needs, none of it HTTP: engines, prices, limits, the URL-fetch policy."""

from __future__ import annotations

from dataclasses import dataclass

from imgsvc.billing.pricing import PriceTable, load_prices
from imgsvc.config import Settings
from imgsvc.fetch import FetchPolicy, parse_networks
from imgsvc.images import Limits
from imgsvc.models.device import select_device
from imgsvc.models.registry import Registry


@dataclass(frozen=True)
class Context:
    registry: Registry
    prices: PriceTable
    limits: Limits  # largest upload and decoded input
    max_output_pixels: int
    max_inpaint_steps: int
    fetch: FetchPolicy

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        registry: Registry | None = None,
        prices: PriceTable | None = None,
    ) -> Context:
        """The context a process with these settings runs operations in."""
        return cls(
            registry=registry or registry_from_settings(settings),
            prices=prices or load_prices(settings.prices_file),
            limits=Limits(
                max_bytes=settings.max_upload_bytes, max_pixels=settings.max_input_pixels
            ),
            max_output_pixels=settings.max_output_pixels,
            max_inpaint_steps=settings.max_inpaint_steps,
            fetch=FetchPolicy(
                max_bytes=settings.max_upload_bytes,
                timeout_s=settings.url_fetch_timeout_s,
                allow=parse_networks(settings.url_fetch_allow_cidrs),
            ),
        )


def registry_from_settings(settings: Settings) -> Registry:
    """Engines on the configured device (DeviceUnavailable if IMGSVC_DEVICE=cuda has no GPU)."""
    return Registry(
        settings.weights_dir,
        select_device(settings.device),
        requested_device=settings.device,
        upscale_tile=settings.upscale_tile,
        upscale_compile=settings.torch_compile,
        upscale_cpu_bf16=settings.upscale_cpu_bf16,
        upscale_cpu_winograd=settings.upscale_cpu_winograd,
        concurrency={
            "remove-background": settings.concurrency_remove_background,
            "upscale": settings.concurrency_upscale,
            "inpaint": settings.concurrency_inpaint,
        },
        inpaint_queue_depth=settings.inpaint_queue_depth,
    )
