"""Run a prepared call, charged: admission → hold → run → capture; any failure releases.

The one place where an operation meets money. A request handler and a batch worker call it the
same way, from a worker thread (it blocks while the call waits for its device slot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imgsvc import metrics
from imgsvc.billing.charge import Meter
from imgsvc.billing.idempotency import Completion
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord
from imgsvc.errors import ServiceError
from imgsvc.models.admission import Admission, Ticket
from imgsvc.operations.prepared import Prepared, Result


class Cancelled(ServiceError):
    """The caller went away before the result was charged: the hold is released."""

    code = "client_closed_request"


@dataclass(frozen=True)
class Charged:
    result: Result
    charged: int  # credits taken
    remaining: int  # the account's balance afterwards


def execute(
    prepared: Prepared,
    *,
    meter: Meter,
    admission: Admission,
    key: KeyInfo,
    request_id: str,
    client_ref: str | None = None,
    cancelled: threading.Event | None = None,
    completion: Callable[[Result], Completion] | None = None,
) -> Charged:
    """Charge at most `prepared.credits` for `prepared.run()`, only if it succeeds.

    Raises Busy (before any hold) when the operation's queue is full, InsufficientCredits when
    the account cannot pay, whatever the work raises (the hold is then released), and
    Cancelled when `cancelled` is set before the capture. `completion(result)`, when given,
    is the idempotent response stored in the capture's transaction.
    """
    with (
        admission.admit(prepared.operation) as ticket,
        meter.hold(
            key=key,
            credits=prepared.credits,
            request_id=request_id,
            price_version=prepared.price_version,
        ) as charge,
        metrics.Settlement(prepared.operation, prepared.credits) as settlement,
    ):
        result, duration_ms = run_admitted(prepared, ticket, cancelled)
        _check(cancelled)
        usage = UsageRecord(
            operation=prepared.operation,
            model=result.model,
            input_size=result.input_size,
            output_size=result.output_size,
            duration_ms=duration_ms,
            price_version=prepared.price_version,
            client_ref=client_ref,
        )
        credits = prepared.credits if result.credits is None else result.credits
        stored = None if completion is None else completion(result)
        charged, remaining = charge.capture(credits=credits, usage=usage, completion=stored)
        settlement.captured(charged)
    return Charged(result, charged, remaining)


def run_admitted(
    prepared: Prepared, ticket: Ticket, cancelled: threading.Event | None = None
) -> tuple[Result, int]:
    """Run an admitted call in its device slot: (result, milliseconds the work took)."""
    device_call = metrics.DeviceCall(prepared.operation, prepared.model, ticket.device)
    with device_call, ticket.running():
        device_call.started()
        _check(cancelled)
        started = time.perf_counter()
        result = prepared.run()
        return result, round((time.perf_counter() - started) * 1000)


def _check(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Cancelled("the caller went away")
