"""Batch jobs, measured side by side.

    python bench/jobs.py throughput [--photos 20] [--size 640]
    python bench/jobs.py control-plane [--workers 4] [--items 2000]

throughput: the same photos through one job (POST /v1/jobs, result zip) and through as many
synchronous calls (POST /v1/remove-background, one after another), on one real server on the
embedded default with its in-process item thread: the same device slot serves both. Reports
photos/s of each and their ratio. The photos are made from bench/data (resized, mirrored and
cropped variants).

control-plane: what the job machinery costs without any model. A no-op operation registered
only here; N items put in one job directly in the store (a throw-away PostgreSQL database on the
local server), published to the local RabbitMQ, run by `--workers` worker processes (Celery solo
pool, the same `ItemRunner` as `imgsvc worker`). Reports items/s end to end, and where a worker's
time per item goes (claim, run + output file, capture transaction, the rest: Celery and broker).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
from PIL import Image, ImageOps
from pydantic import BaseModel
from sqlalchemy import create_engine, func, select, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgsvc.billing import keys  # noqa: E402
from imgsvc.billing.db import Database  # noqa: E402
from imgsvc.config import Settings  # noqa: E402
from imgsvc.jobs import store  # noqa: E402
from imgsvc.jobs.files import JobFiles  # noqa: E402
from imgsvc.jobs.schema import Job, JobItem  # noqa: E402
from imgsvc.operations import catalog  # noqa: E402
from imgsvc.operations.prepared import Prepared, Quote, Result  # noqa: E402

PG_ADMIN = os.environ.get(
    "IMGSVC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RABBITMQ = os.environ.get("IMGSVC_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
IMGSVC = [sys.executable, "-m", "imgsvc"]
BENCH_KEY = ["--credits", "100000000", "--rate-limit", "100000/minute"]
FINISHED = ("succeeded", "partially_failed", "failed", "canceled")


# --- throughput: a job vs synchronous calls --------------------------------------------------


def photos(count: int, size: int) -> list[bytes]:
    sources = sorted((REPO / "bench" / "data").rglob("*.jpg"))
    out = []
    for n in range(count):
        img = Image.open(sources[n % len(sources)]).convert("RGB")
        if (n // len(sources)) % 2:
            img = ImageOps.mirror(img)
        w, h = img.size
        inset = (n // (2 * len(sources))) * 0.03
        img = img.crop((int(w * inset), int(h * inset), int(w * (1 - inset)), int(h * (1 - inset))))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@contextmanager
def server(tmp: Path, **env: str) -> Iterator[tuple[str, dict[str, str]]]:
    from tests.utils import linked_weights, start_server, stop_server

    weights = linked_weights(tmp / "weights", REPO / "weights", None)
    srv = start_server(tmp, weights, **env)
    try:
        yield srv.url, srv.env
    finally:
        stop_server(srv)


def new_key(env: dict[str, str]) -> str:
    done = subprocess.run(
        [*IMGSVC, "keys", "create", "--name", "bench", *BENCH_KEY],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def throughput(args: argparse.Namespace) -> None:
    images = photos(args.photos, args.size)
    with (
        tempfile.TemporaryDirectory() as tmp,
        server(Path(tmp), IMGSVC_JOBS_DIR=str(Path(tmp) / "jobs"), IMGSVC_TORCH_THREADS="2") as (
            url,
            env,
        ),
    ):
        key = new_key(env)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        warm = client.post("/v1/remove-background", files={"image": ("w.jpg", images[0])})
        warm.raise_for_status()
        rounds: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for n, data in enumerate(images):
                r = client.post("/v1/remove-background", files={"image": (f"{n}.jpg", data)})
                r.raise_for_status()
            sync_s = time.perf_counter() - started

            started = time.perf_counter()
            files = [("files", (f"{n}.jpg", data, "image/jpeg")) for n, data in enumerate(images)]
            r = client.post("/v1/jobs", data={"operation": "remove-background"}, files=files)
            r.raise_for_status()
            job_id = r.json()["id"]
            while client.get(f"/v1/jobs/{job_id}").json()["status"] not in FINISHED:
                time.sleep(0.05)
            result = client.get(f"/v1/jobs/{job_id}/result")
            result.raise_for_status()
            job_s = time.perf_counter() - started
            outputs = [n for n in zipfile.ZipFile(io.BytesIO(result.content)).namelist()]
            assert len(outputs) == len(images) + 2, outputs
            rounds.append((sync_s, job_s))
        client.close()
    print(f"{args.photos} photos, longest side {args.size} px, remove-background (u2netp), CPU")
    for n, (sync_s, job_s) in enumerate(rounds, start=1):
        print(
            f"round {n}: sync {args.photos / sync_s:.2f} photos/s ({sync_s:.2f} s), "
            f"job {args.photos / job_s:.2f} photos/s ({job_s:.2f} s), "
            f"job/sync throughput {sync_s / job_s:.3f}"
        )
    best_sync = min(s for s, _ in rounds)
    best_job = min(j for _, j in rounds)
    print(f"best of {len(rounds)}: job/sync throughput {best_sync / best_job:.3f}")


# --- control plane: a no-op operation through Celery + PostgreSQL ----------------------------


class NoOptions(BaseModel):
    pass


def _noop_quote(options: Any, width: int, height: int, ctx: Any) -> Quote:
    return Quote("noop", 1, (1, 1), "bench")  # type: ignore[arg-type]


def _noop_prepare(options: Any, data: bytes, shared: Any, ctx: Any) -> Prepared:
    result = Result(b"ok", "image/png", "noop", (1, 1), (1, 1))
    return Prepared(_noop_quote(options, 1, 1, ctx), "noop", (1, 1), lambda: result)


def register_noop() -> None:
    catalog.OPERATIONS["noop"] = catalog.OperationKind(
        "noop",  # type: ignore[arg-type]
        NoOptions,
        (),
        _noop_quote,
        _noop_prepare,
    )


class Timed:
    """Seconds spent in a function, summed per process (written to a file at each 100th call)."""

    totals: ClassVar[dict[str, float]] = {}
    calls: ClassVar[dict[str, int]] = {}

    @classmethod
    def wrap(cls, name: str, fn: Any, out: Path) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                cls.totals[name] = cls.totals.get(name, 0.0) + time.perf_counter() - started
                cls.calls[name] = cls.calls.get(name, 0) + 1
                if cls.calls[name] % 50 == 0 or name == "task":
                    out.write_text(json.dumps({"totals": cls.totals, "calls": cls.calls}))

        return timed


def noop_worker(args: argparse.Namespace) -> None:
    """One worker process (started by control_plane)."""
    register_noop()
    from imgsvc.jobs import runner, worker
    from imgsvc.models.admission import Admission

    stats = Path(args.stats)
    runner.store.claim = Timed.wrap("claim", runner.store.claim, stats)  # type: ignore[method-assign]
    runner.store.succeed = Timed.wrap("capture", runner.store.succeed, stats)  # type: ignore[method-assign]
    runner.ItemRunner._run_claimed = Timed.wrap(  # type: ignore[method-assign]
        "claimed", runner.ItemRunner._run_claimed, stats
    )
    runner.ItemRunner.run = Timed.wrap("task", runner.ItemRunner.run, stats)  # type: ignore[method-assign]
    real_context = worker.Context.from_settings

    def context(settings: Settings, **kw: Any) -> Any:
        ctx = real_context(settings, **kw)
        ctx.registry.admission = Admission({"noop": 1}, {"noop": None}, exclusive=False)
        return ctx

    worker.Context.from_settings = context  # type: ignore[method-assign]
    settings = Settings(preload_models=False)
    worker.run(settings, ["noop"], name=f"bench-{os.getpid()}@bench")


def control_plane(args: argparse.Namespace) -> None:
    register_noop()
    from imgsvc.jobs.fleet import CeleryDispatcher, make_celery, queue_name
    from imgsvc.jobs.sweeper import dispatch_new

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"imgsvc_bench_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    tmp = Path(tempfile.mkdtemp())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        db = Database(url)
        db.migrate()
        key, _ = keys.create_key(db, name="bench", credits=10**9)
        app = make_celery(RABBITMQ, item_timeout_s=60)
        with app.connection_for_write() as conn:
            queue = app.amqp.queues[queue_name("noop")](conn.default_channel)
            queue.declare()
            queue.purge()
        env = {
            **os.environ,
            "IMGSVC_DATABASE_URL": url,
            "IMGSVC_BROKER_URL": RABBITMQ,
            "IMGSVC_JOBS_DIR": str(tmp / "jobs"),
            "IMGSVC_DEVICE": "cpu",
            "IMGSVC_JOB_SWEEP_SECONDS": "5",
        }
        for n in range(args.workers):
            log = (tmp / f"worker{n}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "_worker", "--stats", str(tmp / f"stats{n}.json")],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 120
        while not all(
            "ready." in (tmp / f"worker{n}.log").read_text(errors="replace")
            for n in range(args.workers)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError((tmp / "worker0.log").read_text())
            time.sleep(0.2)

        files = JobFiles(tmp / "jobs")
        items = [store.NewItem(f"{n}.png", b"x", 1, "bench") for n in range(args.items)]
        job = store.NewJob("noop", {}, items, {}, "req_bench", "http://bench/v1/jobs")
        created = time.perf_counter()
        row = store.create(db, files, key, job, hold_ttl=timedelta(hours=1))
        stored_s = time.perf_counter() - created
        dispatcher = CeleryDispatcher(app)
        started = time.perf_counter()
        dispatch_new(db, dispatcher, row.id)
        published_s = time.perf_counter() - started
        while True:
            with db.read() as s:
                status = s.scalar(select(Job.status).where(Job.id == row.id))
            if status in FINISHED:
                break
            time.sleep(0.02)
        total_s = time.perf_counter() - started
        with db.read() as s:
            done = s.scalar(
                select(func.count()).where(JobItem.job_id == row.id, JobItem.status == "succeeded")
            )
        time.sleep(1)
        totals: dict[str, float] = {}
        calls: dict[str, int] = {}
        for n in range(args.workers):
            path = tmp / f"stats{n}.json"
            if path.exists():
                data = json.loads(path.read_text())
                for k, v in data["totals"].items():
                    totals[k] = totals.get(k, 0.0) + v
                for k, v in data["calls"].items():
                    calls[k] = calls.get(k, 0) + v
        dispatcher.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(
        f"{args.items} no-op items, {args.workers} worker processes, RabbitMQ + PostgreSQL, "
        f"{os.cpu_count()} cores"
    )
    print(f"store the job (inputs + items + holds): {stored_s * 1000:.0f} ms")
    print(f"publish {args.items} messages: {published_s:.2f} s")
    print(f"end to end: {done} items in {total_s:.2f} s = {args.items / total_s:.0f} items/s")
    n = max(calls.get("task", 1), 1)
    per = {k: totals.get(k, 0.0) / n * 1000 for k in ("task", "claim", "claimed", "capture")}
    print(
        f"per item, in a worker: task {per['task']:.2f} ms = claim {per['claim']:.2f} ms"
        f" + run, output file and capture {per['claimed']:.2f} ms"
        f" (of which the capture transaction {per['capture']:.2f} ms)"
    )
    busy = totals.get("task", 0.0) / args.workers
    print(
        f"worker time in the runner: {busy / total_s * 100:.0f}% of the wall time; "
        "the rest is Celery's consume/ack and the broker"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--photos", type=int, default=20)
    t.add_argument("--size", type=int, default=640)
    t.add_argument("--rounds", type=int, default=2)
    c = sub.add_parser("control-plane")
    c.add_argument("--workers", type=int, default=4)
    c.add_argument("--items", type=int, default=2000)
    w = sub.add_parser("_worker")
    w.add_argument("--stats", required=True)
    args = parser.parse_args()
    {"throughput": throughput, "control-plane": control_plane, "_worker": noop_worker}[args.cmd](
        args
    )


if __name__ == "__main__":
    main()
