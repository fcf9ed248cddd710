"""The service's Prometheus metrics: one registry, the metric objects and small helpers to record
them. Pure Python (no HTTP), so engines, billing callers and job runners record what they see;
`GET /metrics` (routes/metrics.py) renders `REGISTRY` in the Prometheus text format.

`imgsvc serve` is one process, so its counters are this process's own. Every name starts with
`imgsvc_`; the list and what each label means is in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

# Seconds, from a fast cut-out to a long CPU upscale or model load.
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "imgsvc_requests",
    "HTTP requests answered, by route template, method, status and model (X-Model)",
    ["route", "method", "status", "model"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "imgsvc_request_duration_seconds",
    "time from a request's arrival to the end of its response, by route template and method",
    ["route", "method"],
    buckets=_CALL_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "imgsvc_queue_wait_seconds",
    "time an admitted call waited for its device slot",
    ["operation", "model", "device"],
    buckets=_WAIT_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "imgsvc_inference_seconds",
    "time a call's model work took in its device slot (decode to encoded result)",
    ["operation", "model", "device"],
    buckets=_CALL_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "imgsvc_queue_depth",
    "admitted calls waiting for a device slot now",
    ["operation"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "imgsvc_in_flight",
    "calls running in a device slot now",
    ["operation"],
    registry=REGISTRY,
)
JOB_ITEMS = Counter(
    "imgsvc_job_items",
    "batch job item deliveries run by this process, by outcome: succeeded, failed, retried, "
    "skipped (not claimable: finished, canceled or leased elsewhere), duplicate_blocked (run, "
    "but another delivery had committed it: nothing charged)",
    ["outcome"],
    registry=REGISTRY,
)
JOB_ITEMS_REDELIVERED = Counter(
    "imgsvc_job_items_redelivered",
    "batch job items claimed again after an earlier attempt (retry or a lost worker's lease)",
    registry=REGISTRY,
)
CREDITS_CAPTURED = Counter(
    "imgsvc_credits_captured",
    "credits charged by synchronous calls, by operation",
    ["operation"],
    registry=REGISTRY,
)
CREDITS_RELEASED = Counter(
    "imgsvc_credits_released",
    "credits held by synchronous calls and given back (failed, cancelled or not-charged calls, "
    "and the unused rest of a hold), by operation",
    ["operation"],
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Histogram(
    "imgsvc_model_load_seconds",
    "time to load a model's engine (once per model and process)",
    ["operation", "model"],
    buckets=_LOAD_BUCKETS,
    registry=REGISTRY,
)
OOM_RETRIES = Counter(
    "imgsvc_oom_retries",
    "CUDA out-of-memory errors recovered from by retrying on smaller tiles, by model",
    ["model"],
    registry=REGISTRY,
)

Text = TypeVar("Text", bound=str)
_JOB_OUTCOMES = {"retry": "retried", "duplicate": "duplicate_blocked"}


def count_job_item(outcome: Text) -> Text:
    """Count one job item delivery by its runner outcome; returns `outcome`."""
    JOB_ITEMS.labels(_JOB_OUTCOMES.get(outcome, outcome)).inc()
    return outcome


@contextlib.contextmanager
def model_load(operation: str, model: str) -> Iterator[None]:
    """Time one engine load (observed only when it succeeds)."""
    started = time.perf_counter()
    yield
    MODEL_LOAD_SECONDS.labels(operation, model).observe(time.perf_counter() - started)


class DeviceCall:
    """One admitted call's time on the device: waiting for its slot, then running in it. Enter
    it before the slot is taken (`with call, ticket.running():`) and call `started()` first
    thing inside."""

    def __init__(self, operation: str, model: str, device: str) -> None:
        self._operation = operation
        self._labels = (operation, model, device)
        self._since = 0.0
        self._running = False

    def __enter__(self) -> DeviceCall:
        QUEUE_DEPTH.labels(self._operation).inc()
        self._since = time.perf_counter()
        return self

    def started(self) -> None:
        """The call has its slot: its wait ends, its work begins."""
        now = time.perf_counter()
        QUEUE_DEPTH.labels(self._operation).dec()
        QUEUE_WAIT_SECONDS.labels(*self._labels).observe(now - self._since)
        IN_FLIGHT.labels(self._operation).inc()
        self._since, self._running = now, True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._running:  # never got its slot
            QUEUE_DEPTH.labels(self._operation).dec()
            return
        IN_FLIGHT.labels(self._operation).dec()
        if exc_type is None:
            INFERENCE_SECONDS.labels(*self._labels).observe(time.perf_counter() - self._since)


class Settlement:
    """The credits of one held call: `captured(n)` once charged; what the hold does not charge
    (all of it when the block fails) counts as released when the block ends."""

    def __init__(self, operation: str, held: int) -> None:
        self._operation = operation
        self._held = held
        self._charged = 0

    def __enter__(self) -> Settlement:
        return self

    def captured(self, credits: int) -> None:
        self._charged = credits
        CREDITS_CAPTURED.labels(self._operation).inc(credits)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        given_back = self._held - self._charged
        if given_back > 0:
            CREDITS_RELEASED.labels(self._operation).inc(given_back)


class GpuMemoryCollector(Collector):
    """GPU memory used and total at scrape time, only in a process that uses CUDA (one whose
    torch has initialised it; a CPU-only process never creates a CUDA context for this)."""

    def collect(self) -> Iterable[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        used = GaugeMetricFamily(
            "imgsvc_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["gpu"]
        )
        used.add_metric([str(index)], float(total - free))
        size = GaugeMetricFamily(
            "imgsvc_gpu_memory_total_bytes", "GPU memory of the device", labels=["gpu"]
        )
        size.add_metric([str(index)], float(total))
        return [used, size]


REGISTRY.register(GpuMemoryCollector())
