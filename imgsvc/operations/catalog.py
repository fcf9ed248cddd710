"""Every operation by name, in the one shape a batch item needs: its options model, the files
shared by all items of a job (a background, a mask), a quote from the image alone, and
`prepare` from an item's bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.models.registry import Operation
from imgsvc.operations import inpaint, remove_background, upscale
from imgsvc.operations.context import Context
from imgsvc.operations.prepared import Prepared, Quote

Shared = Mapping[str, bytes]


@dataclass(frozen=True)
class OperationKind:
    name: Operation
    options: type[BaseModel]
    shared_files: tuple[str, ...]  # form fields every item of a job uses (not items)
    _quote: Callable[[Any, int, int, Context], Quote]
    _prepare: Callable[[Any, bytes, Shared, Context], Prepared]
    _check: Callable[[Any], None] = lambda options: None

    def parse(self, fields: Mapping[str, Any]) -> BaseModel:
        """The options from form fields or JSON (InvalidInput names the bad field)."""
        from pydantic import ValidationError

        try:
            options = self.options.model_validate(dict(fields))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            raise InvalidInput(f"{self.name} option {where}: {first['msg']}") from None
        self._check(options)
        return options

    def quote_image(self, options: BaseModel, data: bytes, ctx: Context) -> Quote:
        """Decode and validate one item's image and price it (no engine is loaded)."""
        img = images.decode(data, ctx.limits)
        return self._quote(options, img.width, img.height, ctx)

    def prepare(self, options: BaseModel, data: bytes, shared: Shared, ctx: Context) -> Prepared:
        return self._prepare(options, data, shared, ctx)


def _prepare_cutout(
    options: remove_background.RemoveBackgroundOptions, data: bytes, shared: Shared, ctx: Context
) -> Prepared:
    inputs = remove_background.RemoveBackgroundInputs(image=data, bg_image=shared.get("bg_image"))
    return remove_background.prepare(options, inputs, ctx)


def _check_cutout(options: remove_background.RemoveBackgroundOptions) -> None:
    remove_background.resolve(options, None)  # every option that needs no image


def _prepare_upscale(
    options: upscale.UpscaleOptions, data: bytes, shared: Shared, ctx: Context
) -> Prepared:
    return upscale.prepare(options, upscale.UpscaleInputs(data), ctx)


def _prepare_inpaint(
    options: inpaint.InpaintOptions, data: bytes, shared: Shared, ctx: Context
) -> Prepared:
    return inpaint.prepare(options, inpaint.InpaintInputs(data, shared.get("mask")), ctx)


OPERATIONS: dict[str, OperationKind] = {
    "remove-background": OperationKind(
        "remove-background",
        remove_background.RemoveBackgroundOptions,
        ("bg_image",),
        remove_background.quote,
        _prepare_cutout,
        _check_cutout,
    ),
    "upscale": OperationKind(
        "upscale", upscale.UpscaleOptions, (), upscale.quote, _prepare_upscale
    ),
    "inpaint": OperationKind(
        "inpaint", inpaint.InpaintOptions, ("mask",), inpaint.quote, _prepare_inpaint
    ),
}


def operation_kind(name: str) -> OperationKind:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise InvalidInput(
            f"operation must be one of {', '.join(OPERATIONS)} (got {name[:40]!r})"
        ) from None
