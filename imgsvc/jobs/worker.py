"""`imgsvc worker`: one Celery worker process running batch items on one device.

Solo pool (the item runs in this process, never in a forked child, so CUDA is initialised once,
after start, in the process that uses it); one message at a time; the queues of the operations
this host serves. The models of those operations are loaded once, when the worker is ready. The
worker also runs the job store's upkeep (re-queue lost items, expire old results), so a fleet
recovers from a dead worker even while no API process is up.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from imgsvc.billing.db import Database
from imgsvc.config import Settings
from imgsvc.jobs.fleet import TASK, CeleryDispatcher, make_celery, queue_name
from imgsvc.jobs.runner import ItemRunner
from imgsvc.jobs.runtime import Upkeep, runner_from_settings
from imgsvc.operations.catalog import OPERATIONS
from imgsvc.operations.context import Context

log = logging.getLogger("imgsvc.worker")


class _Worker:
    """The process's runner, built when the worker is ready (after Celery's start-up)."""

    runner: ItemRunner | None = None
    upkeep: Upkeep | None = None


def build_app(settings: Settings, operations: Sequence[str]) -> Celery:
    if not settings.broker_url:
        raise SystemExit("imgsvc worker needs IMGSVC_BROKER_URL (amqp://… or redis://…)")
    app = make_celery(settings.broker_url, item_timeout_s=settings.job_item_timeout_seconds)
    state = _Worker()

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_item(item_id: int) -> str:
        if state.runner is None:
            _start(settings, operations, state, app)
        assert state.runner is not None
        outcome = state.runner.run(int(item_id))
        log.info("item #%d: %s", item_id, outcome)
        return outcome

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: object) -> None:
        if state.runner is None:
            _start(settings, operations, state, app)

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _shutdown(**_: object) -> None:
        if state.upkeep is not None:
            state.upkeep.close()
        if state.runner is not None:
            state.runner.close()

    return app


def _start(settings: Settings, operations: Sequence[str], state: _Worker, app: Celery) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    db = Database(settings.database_url)
    db.migrate()
    ctx = Context.from_settings(settings)
    if settings.preload_models:
        ctx.registry.preload(operations=tuple(operations))
    state.runner = runner_from_settings(settings, db, ctx, "worker")
    state.upkeep = Upkeep(settings, db, CeleryDispatcher(app), webhook_policy=None)
    state.upkeep.start()
    log.info("worker ready for %s on %s", ", ".join(operations), ctx.registry.device)


def default_name(operations: Sequence[str]) -> str:
    """The worker's Celery name (what `celery inspect ping -d` asks for)."""
    return f"imgsvc-{'+'.join(operations)}@{socket.gethostname()}"


def run(settings: Settings, operations: Sequence[str], *, name: str | None = None) -> int:
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise SystemExit(f"unknown operation(s): {', '.join(unknown)}; use {', '.join(OPERATIONS)}")
    app = build_app(settings, operations)
    hostname = name or default_name(operations)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(queue_name(op) for op in operations)}",
        f"--hostname={hostname}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0
