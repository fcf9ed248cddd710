"""The API process killed (SIGKILL) in the middle of a charged call: nothing is charged, and
the hold is given back by the sweeper of the next start, or of another replica meanwhile."""

from __future__ import annotations

import io
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

from tests.faults import Books, account_credits, read_books, wait_for
from tests.utils import DATA, Server, linked_weights, start_server, stop_server

CREDITS = 100
# Holds expire 2 s after their last heartbeat; sweeps every half second.
SHORT_HOLDS = {
    "IMGSVC_PRELOAD_MODELS": "false",
    "IMGSVC_HOLD_TTL_SECONDS": "2",
    "IMGSVC_SWEEP_INTERVAL_SECONDS": "0.5",
}


def slow_upscale_files() -> dict[str, tuple[str, bytes, str]]:
    """An upscale that takes seconds on a CPU (x4plus, the default model)."""
    buf = io.BytesIO()
    Image.open(DATA / "car.jpg").convert("RGB").resize((200, 150)).save(buf, "PNG")
    return {"image": ("car.png", buf.getvalue(), "image/png")}


def kill_during_upscale(server: Server, key: str) -> None:
    """Start a slow upscale, SIGKILL the server while it runs (its credits held), and check
    that the client got no answer."""
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            with server.client(key) as c:
                outcome["response"] = c.post("/v1/upscale", files=slow_upscale_files())
        except httpx.TransportError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    wait_for("the upscale holds its credits", lambda: account_credits(server, key) < CREDITS)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    caller.join(timeout=60)
    assert "response" not in outcome, "the call was answered before the server was killed"
    assert isinstance(outcome.get("error"), httpx.TransportError)


def assert_released_uncharged(books: Books) -> None:
    assert books.usage == {}, "a call that delivered no result was charged"
    assert books.ledger == ["grant", "hold", "release"]
    assert books.held == 0


def test_hold_of_a_killed_server_is_released_at_its_next_start(
    tmp_path: Path, repo_weights: Path
) -> None:
    weights = linked_weights(tmp_path / "weights", repo_weights, None)
    env = {**SHORT_HOLDS, "IMGSVC_JOBS_DIR": str(tmp_path / "jobs")}
    first = start_server(tmp_path, weights, **env)
    try:
        key = first.new_key(CREDITS)
        kill_during_upscale(first, key)
    finally:
        stop_server(first)
    again = start_server(tmp_path, weights, **env)  # the same SQLite database
    try:
        wait_for("credits back", lambda: account_credits(again, key) == CREDITS)
        assert_released_uncharged(read_books(again.env["IMGSVC_DATABASE_URL"]))
        assert "ledger ok" in again.cli("billing", "verify")
    finally:
        stop_server(again)


def test_hold_of_a_killed_replica_is_released_by_another(
    tmp_path: Path, repo_weights: Path, new_postgres_db: Callable[[], str]
) -> None:
    url = new_postgres_db()
    weights = linked_weights(tmp_path / "weights", repo_weights, None)
    replicas: list[Server] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(
                start_server(
                    tmp_path / name,
                    weights,
                    IMGSVC_DATABASE_URL=url,
                    IMGSVC_JOBS_DIR=str(tmp_path / "jobs"),
                    **SHORT_HOLDS,
                )
            )
        doomed, survivor = replicas
        key = survivor.new_key(CREDITS)
        kill_during_upscale(doomed, key)
        wait_for("credits back", lambda: account_credits(survivor, key) == CREDITS)
        assert_released_uncharged(read_books(url))
        assert "ledger ok" in survivor.cli("billing", "verify")
    finally:
        for replica in replicas:
            stop_server(replica)
