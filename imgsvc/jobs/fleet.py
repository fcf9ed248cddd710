"""The fleet runner on Celery: the API publishes one message per item to the queue of its
operation (`imgsvc.upscale`, …); `imgsvc worker` processes consume them, one per GPU.

Delivery is at least once, by design: messages are acknowledged after the item ran
(`acks_late`), given back when a worker dies (`task_reject_on_worker_lost`), and fetched one at
a time (prefetch 1). The job store makes the duplicates this causes harmless (see
`imgsvc/jobs/store.py`); the sweeper publishes again what a dead worker held.

Broker timeouts must exceed the longest item: RabbitMQ's `consumer_timeout` (server setting,
default 30 minutes) and Redis's `visibility_timeout` (set here from `item_timeout_s`).
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.entity import Queue

from imgsvc.operations.catalog import OPERATIONS

TASK = "imgsvc.run_item"


def queue_name(operation: str) -> str:
    return f"imgsvc.{operation}"


def make_celery(broker_url: str, *, item_timeout_s: float) -> Celery:
    """The Celery app the API publishes with and the workers consume with (same settings)."""
    app = Celery("imgsvc", broker=broker_url, set_as_current=False)
    transport: dict[str, object] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis hands an unacknowledged message to another worker after this long.
        transport["visibility_timeout"] = int(item_timeout_s * 2)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_queues=[_queue(op) for op in OPERATIONS],
        task_default_queue=queue_name("upscale"),
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=30,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
    )
    return app


def _queue(operation: str) -> Queue:
    return Queue(queue_name(operation), routing_key=queue_name(operation))  # type: ignore[no-untyped-call]


class CeleryDispatcher:
    """Publishes items for the workers (blocking network I/O: call it from a worker thread)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def dispatch(self, items: Sequence[tuple[int, str]]) -> None:
        for item_id, operation in items:
            self.app.send_task(TASK, args=[item_id], queue=queue_name(operation))

    def close(self) -> None:
        self.app.close()
