"""What `prepare` returns (a priced, validated call not yet run), what `run` produces, a quote."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from imgsvc.models.registry import Operation


@dataclass(frozen=True)
class Result:
    """What an operation produced: the encoded output and the facts to report about it."""

    body: bytes
    media_type: str
    model: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    # Credits to charge when they differ from the prepared price (0 for a useless cut-out).
    credits: int | None = None
    model_version: str | None = None  # the weights' sha256 prefix
    seed: int | None = None  # the seed a prompt inpainting used
    subject_box: tuple[int, int, int, int] | None = None  # the cut-out subject in the output
    warning: str | None = None  # why a result is not useful (then it is not charged)
    compliance: tuple[str, ...] | None = None  # a preset's broken rules (() = passes)


@dataclass(frozen=True)
class Quote:
    """The price and output size of a call, before (or without) doing it."""

    operation: Operation
    credits: int
    output_size: tuple[int, int]
    price_version: str
    exact: bool = True  # False where the model's working size is estimated


@dataclass(frozen=True)
class Prepared:
    """A validated call: its engine picked, its price and output size known, nothing done yet."""

    priced: Quote  # what the call costs and produces (exact)
    model: str
    input_size: tuple[int, int]
    work: Callable[[], Result] = field(repr=False)

    @property
    def operation(self) -> Operation:
        return self.priced.operation

    @property
    def credits(self) -> int:
        return self.priced.credits

    @property
    def output_size(self) -> tuple[int, int]:
        return self.priced.output_size

    @property
    def price_version(self) -> str:
        return self.priced.price_version

    def run(self) -> Result:
        """Do the work (blocking; model calls inside). Raises ServiceError on bad input."""
        return self.work()
