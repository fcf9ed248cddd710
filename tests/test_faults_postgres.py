"""PostgreSQL restarted under load: calls during the outage are refused with 503 + Retry-After
(JSON, never a 500 or a hang), calls succeed again without restarting the API, and nothing
committed is lost (every answered result has its usage row, the balance is the start minus
what was charged)."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.faults import PrivatePostgres, private_postgres, read_books, wait_for
from tests.utils import Server, linked_weights, start_server, stop_server

START_CREDITS = 100_000
CALLERS = 3
CALL_TIMEOUT_S = 30.0  # no call may take longer, outage or not


@dataclass(frozen=True)
class Call:
    caller: int
    started: float
    ended: float
    status: int | None  # None: no answer (a transport error)
    request_id: str
    charged: int
    error: dict[str, object] | None
    retry_after: str | None
    problem: str = ""


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "PNG")
    return buf.getvalue()


class Load:
    """CALLERS threads making cheap charged calls back to back until stopped."""

    def __init__(self, server: Server, key: str) -> None:
        self.server, self.key = server, key
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(CALLERS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S * 2)

    def since(self, t: float) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.started >= t]

    def ok_per_caller_since(self, t: float) -> int:
        calls = self.since(t)
        return min(sum(c.status == 200 for c in calls if c.caller == n) for n in range(CALLERS))

    def summary(self) -> str:
        with self._lock:
            calls = list(self.calls)
        seen = Counter((c.status, (c.error or {}).get("code"), c.problem[:80]) for c in calls)
        return f"answers so far: {dict(seen)}"

    def _run(self, caller: int) -> None:
        files = {"image": ("s.png", tiny_png(), "image/png")}
        data = {"model": "realesr-animevideov3"}
        headers = {"X-API-Key": self.key}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=CALL_TIMEOUT_S) as c:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = c.post("/v1/upscale", files=files, data=data)
                    call = _record(caller, started, r)
                except httpx.TransportError as exc:
                    call = Call(
                        caller, started, time.monotonic(), None, "", 0, None, None, repr(exc)
                    )
                with self._lock:
                    self.calls.append(call)
                if call.status != 200:
                    time.sleep(0.05)  # a refused call comes back at once: do not spin


def _record(caller: int, started: float, r: httpx.Response) -> Call:
    error, problem = None, ""
    if r.status_code != 200:
        try:
            error = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            problem = f"not a JSON error: {r.text[:200]!r}"
    return Call(
        caller,
        started,
        time.monotonic(),
        r.status_code,
        r.headers.get("x-request-id", ""),
        int(r.headers.get("x-credits-charged", "0")),
        error,
        r.headers.get("retry-after"),
        problem,
    )


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


def test_postgres_restart_under_load(
    tmp_path: Path, repo_weights: Path, pg: PrivatePostgres
) -> None:
    weights = linked_weights(tmp_path / "weights", repo_weights, None)
    server = start_server(
        tmp_path,
        weights,
        IMGSVC_DATABASE_URL=pg.url,
        IMGSVC_JOBS_DIR=str(tmp_path / "jobs"),
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_DEFAULT_RATE_LIMIT="100000/minute",
        IMGSVC_HOLD_TTL_SECONDS="2",
        IMGSVC_SWEEP_INTERVAL_SECONDS="0.5",
    )
    try:
        key = server.new_key(START_CREDITS)
        with Load(server, key) as load:
            wait_for("calls succeed", lambda: load.ok_per_caller_since(0) >= 2, detail=load.summary)
            pg.stop("fast")
            down = time.monotonic()
            wait_for(
                "calls refused",
                lambda: len(load.since(down)) >= 3 * CALLERS,
                detail=load.summary,
            )
            assert httpx.get(f"{server.url}/readyz", timeout=CALL_TIMEOUT_S).status_code == 503
            up = time.monotonic()
            pg.start()
            wait_for(
                "calls succeed again",
                lambda: load.ok_per_caller_since(up) >= 2,
                detail=load.summary,
            )
        calls = load.calls
        _check_answers(calls, down, up)
        wait_for("holds of interrupted calls swept", lambda: read_books(pg.url).held == 0)
        books = read_books(pg.url)
        answered = {c.request_id: c.charged for c in calls if c.status == 200}
        unanswered = {r: books.usage[r] for r in books.usage.keys() - answered.keys()}
        lost = {r: answered[r] for r in answered.keys() - books.usage.keys()}
        by_id = {c.request_id: c for c in calls}
        assert (unanswered, lost) == ({}, {}), [by_id.get(r) for r in [*unanswered, *lost]]
        assert books.usage == answered
        with server.client(key) as c:
            assert c.get("/v1/account").json()["credits"] == START_CREDITS - sum(answered.values())
        assert "ledger ok" in server.cli("billing", "verify")
        _check_jobs_run(server, key)
    finally:
        stop_server(server)


def _check_jobs_run(server: Server, key: str) -> None:
    """The job threads lived through the outage: a new job runs."""
    with server.client(key) as c:
        r = c.post(
            "/v1/jobs",
            data={"operation": "upscale", "model": "realesr-animevideov3"},
            files=[("files", ("s.png", tiny_png(), "image/png"))],
        )
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_for(
            "the job finished",
            lambda: (
                c.get(f"/v1/jobs/{job}").json()["status"] != "queued"
                and c.get(f"/v1/jobs/{job}").json()["status"] != "running"
            ),
        )
        assert c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"


def _check_answers(calls: list[Call], down: float, up: float) -> None:
    assert [c for c in calls if c.status is None] == [], "calls without an answer"
    assert [c for c in calls if c.status not in (200, 503) or c.problem] == []
    refused = [c for c in calls if c.status == 503]
    assert refused, "no call was refused during the outage"
    for c in refused:
        assert c.error is not None and c.error["code"] == "database_unavailable", c
        assert c.error["request_id"] == c.request_id
        assert c.retry_after == "1", c
    during = [c for c in calls if c.started > down and c.ended < up]
    assert during and all(c.status == 503 for c in during)
