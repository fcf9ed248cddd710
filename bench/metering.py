"""Metering overhead: the same cheap operation with and without the billing path, side by side.

    python bench/metering.py [--requests 400] [--quick]

For SQLite and PostgreSQL (the local server, a throw-away database) it starts the real app in
one uvicorn server and calls, interleaved on one keep-alive connection:
  - POST /v1/inpaint (erase of a 32x24 image): auth, rate limit, hold, capture, usage row;
  - POST /bench/erase: the same decode → erase → encode with no billing at all.
The added latency is the difference of the percentiles. It then measures ledger captures per
second (hold + capture + usage row, 8 threads) directly against each database.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import anyio.to_thread
import httpx
import uvicorn
from fastapi import FastAPI, File, Response, UploadFile
from PIL import Image
from sqlalchemy import create_engine, text
from starlette.concurrency import run_in_threadpool

from imgsvc.app import create_app
from imgsvc.billing import keys, metering
from imgsvc.billing.db import Database
from imgsvc.billing.metering import UsageRecord
from imgsvc.config import Settings
from imgsvc.operations import inpaint

PG_ADMIN = os.environ.get(
    "IMGSVC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


IMAGE = _png(Image.new("RGB", (32, 24), "gray"))
_mask = Image.new("L", (32, 24), 0)
_mask.paste(255, (8, 8, 16, 16))
MASK = _png(_mask)
FILES = {"image": ("i.png", IMAGE, "image/png"), "mask": ("m.png", MASK, "image/png")}


def bench_app(settings: Settings) -> FastAPI:
    """Our app plus a twin of the erase call that skips only the billing path (key lookup,
    rate limit, hold, capture, usage row): the same prepare, admission and run, in the same
    kind of worker thread."""
    app = create_app(settings)

    @app.post("/bench/erase")
    async def unmetered(
        image: Annotated[UploadFile, File()], mask: Annotated[UploadFile, File()]
    ) -> Response:
        ctx = app.state.context
        inputs = inpaint.InpaintInputs(await image.read(), await mask.read())
        prepared = await run_in_threadpool(inpaint.prepare, inpaint.InpaintOptions(), inputs, ctx)

        def work() -> bytes:
            with ctx.registry.admission.admit("inpaint") as ticket, ticket.running():
                return prepared.run().body

        body = await anyio.to_thread.run_sync(work, limiter=app.state.call_threads)
        return Response(body, media_type="image/png")

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: FastAPI) -> tuple[uvicorn.Server, str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("bench server did not start")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_run(database_url: str, n: int) -> dict[str, float]:
    settings = Settings(
        database_url=database_url,
        weights_dir=Path(tempfile.mkdtemp()),
        device="cpu",
        preload_models=False,
        default_rate_limit="1000000/minute",
    )
    server, url = serve(bench_app(settings))
    db = Database(database_url)
    _, secret = keys.create_key(db, name="bench", credits=10**9)
    metered: list[float] = []
    bare: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as c:
        for path in ("/v1/inpaint", "/bench/erase"):  # warm-up
            for _ in range(20):
                assert c.post(path, files=FILES).status_code == 200
        for _ in range(n):
            for path, sink in (("/v1/inpaint", metered), ("/bench/erase", bare)):
                t0 = time.perf_counter()
                r = c.post(path, files=FILES)
                sink.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
    server.should_exit = True
    assert not metering.ledger_mismatches(db)
    db.dispose()
    return {
        "bare_p50": statistics.median(bare),
        "metered_p50": statistics.median(metered),
        "added_p50": statistics.median(metered) - statistics.median(bare),
        "added_p99": pct(metered, 0.99) - pct(bare, 0.99),
    }


def captures_per_second(database_url: str, seconds: float, threads: int = 8) -> float:
    db = Database(database_url)
    db.migrate()
    info, _ = keys.create_key(db, name="captures", credits=10**9)
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            rid = f"b{i}-{secrets.token_hex(6)}"
            hold = metering.reserve(db, key=info, credits=1, request_id=rid, ttl=timedelta(60))
            usage = UsageRecord("inpaint", "bench", (1, 1), (1, 1), 0, "bench")
            metering.capture(db, hold_id=hold, credits=1, key=info, request_id=rid, usage=usage)
            counts[i] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - started
    assert not metering.ledger_mismatches(db)
    db.dispose()
    return sum(counts) / elapsed


def with_databases(run: Callable[[str], object]) -> dict[str, object]:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run(f"sqlite:///{tmp}/bench.db")
    name = f"imgsvc_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        results["postgresql"] = run(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per endpoint and database")
    parser.add_argument("--seconds", type=float, default=10, help="capture throughput run")
    parser.add_argument("--quick", action="store_true", help="a few seconds, to check it works")
    args = parser.parse_args()
    n, secs = (30, 2.0) if args.quick else (args.requests, args.seconds)
    print(f"metering overhead, {n} interleaved calls each, erase of a 32x24 PNG")
    print("| database | unmetered p50 ms | metered p50 ms | added p50 ms | added p99 ms |")
    print("|---|---|---|---|---|")
    for db_name, r in with_databases(lambda url: latency_run(url, n)).items():
        assert isinstance(r, dict)
        print(
            f"| {db_name} | {r['bare_p50']:.2f} | {r['metered_p50']:.2f} | "
            f"{r['added_p50']:.2f} | {r['added_p99']:.2f} |"
        )
    print(f"\nledger captures per second (hold + capture + usage row, 8 threads, {secs:.0f} s)")
    print("| database | captures/s |")
    print("|---|---|")
    for db_name, rate in with_databases(lambda url: captures_per_second(url, secs)).items():
        print(f"| {db_name} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
