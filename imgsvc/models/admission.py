"""Admission control for one device, the same for every operation.

Each operation runs at most `slots[op]` calls at once on the device; beyond those, at most
`depth[op]` more may wait (None: no bound). On a GPU (`exclusive`), one model call at a time
runs on the device across all operations, so background removal, upscaling and inpainting never
share its memory at once.

A call is counted in with `admit(op)` *before* any credit is reserved: when its queue is full
that raises `Busy` (503 + Retry-After, from recent call durations), so a refused call costs
nothing. The admitted call then runs its model work inside `ticket.running()`, which blocks its
thread until a slot (and on a GPU the device) is free. Thread-based, so the same mechanism serves
a request handler's worker thread and a batch worker.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imgsvc.errors import Busy


@dataclass
class _Queue:
    slots: threading.Semaphore
    width: int
    depth: int | None
    admitted: int = 0
    estimate_s: float = 5.0  # moving average of one call's duration, for Retry-After

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.estimate_s * max(1, self.admitted) / self.width))


class Ticket:
    """One admitted call: `running()` holds its slot for the model work."""

    def __init__(self, admission: Admission, queue: _Queue) -> None:
        self._admission = admission
        self._queue = queue

    @property
    def device(self) -> str:
        """Where the call runs (`cpu` or `cuda`), for metrics."""
        return self._admission.device

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._queue.slots, self._admission.device_lock():
            started = time.perf_counter()
            try:
                yield
            finally:
                self._admission._observe(self._queue, time.perf_counter() - started)


class Admission:
    """Slots and bounded waiting per operation, and the device lock on a GPU."""

    def __init__(
        self,
        slots: Mapping[Any, int],
        depth: Mapping[Any, int | None],
        *,
        exclusive: bool,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self._queues = {
            op: _Queue(threading.Semaphore(n), n, depth.get(op)) for op, n in slots.items()
        }
        self._device = threading.Lock() if exclusive else None
        self._guard = threading.Lock()

    def admitted(self, op: str) -> int:
        """Calls of `op` running or waiting now."""
        return self._queues[op].admitted

    @contextlib.contextmanager
    def admit(self, op: str) -> Iterator[Ticket]:
        """Hold a place (running or waiting) for one call of `op`; Busy when the queue is full."""
        queue = self._queues[op]
        with self._guard:
            if queue.depth is not None and queue.admitted >= queue.width + queue.depth:
                wait = queue.retry_after_s()
                raise Busy(
                    f"the {op} queue is full ({queue.admitted} calls running or waiting); "
                    f"retry in about {wait} s",
                    retry_after_s=wait,
                )
            queue.admitted += 1
        try:
            yield Ticket(self, queue)
        finally:
            with self._guard:
                queue.admitted -= 1

    def device_lock(self) -> contextlib.AbstractContextManager[object]:
        return self._device if self._device is not None else contextlib.nullcontext()

    def _observe(self, queue: _Queue, seconds: float) -> None:
        with self._guard:
            queue.estimate_s = 0.7 * queue.estimate_s + 0.3 * seconds
