"""One model call at a time per device, with a bounded number of callers waiting for it.

`admit()` is taken by a request *before* any credit is reserved: when `depth` requests are
already waiting (plus the one running), it raises `QueueFull` (503 + `Retry-After`), so a
refused call costs nothing. Engines hold `lock` around the model call itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from imgsvc.errors import ServiceError


class QueueFull(ServiceError):
    code = "queue_full"
    status = 503


class DeviceQueue:
    """Admission control and the device lock shared by the inpainting engines."""

    def __init__(self, depth: int, *, initial_estimate_s: float = 5.0) -> None:
        self.depth = depth
        self.lock = threading.Lock()
        self._guard = threading.Lock()
        self._admitted = 0
        self._estimate_s = initial_estimate_s  # moving average of one call, for Retry-After

    @property
    def admitted(self) -> int:
        return self._admitted

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._estimate_s * max(1, self._admitted)))

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place (running or waiting) for the duration of one request."""
        with self._guard:
            if self._admitted > self.depth:
                wait = self.retry_after_s()
                raise QueueFull(
                    f"the inpainting queue is full ({self._admitted} calls running or waiting); "
                    f"retry in about {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            self._admitted += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._guard:
                self._admitted -= 1
                self._estimate_s = 0.7 * self._estimate_s + 0.3 * elapsed / (self._admitted + 1)
