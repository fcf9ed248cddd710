"""An engine that raises, or runs out of memory, in the real server (uvicorn over loopback,
in a thread of this process so the test can make the model fail once): the caller gets a JSON
error (the service's fault: 500 `internal_error`), nothing is charged, the hold is released,
and the next call, and the next batch item, work."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from imgsvc.app import create_app
from imgsvc.billing import keys, metering
from imgsvc.config import Settings
from tests.faults import read_books, serve_in_thread, wait_for
from tests.utils import SECRETS, linked_weights

CREDITS = 1000
MODEL = "realesr-animevideov3"


@dataclass(frozen=True)
class Served:
    app: FastAPI
    url: str
    database_url: str

    def new_key(self) -> str:
        _, secret = keys.create_key(self.app.state.db, name="engine-fault", credits=CREDITS)
        SECRETS.add(secret)
        return secret

    def client(self, secret: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": secret}, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("engine-faults")
    database_url = f"sqlite:///{tmp / 'imgsvc.db'}"
    settings = Settings(
        database_url=database_url,
        weights_dir=linked_weights(tmp / "weights", repo_weights, None),
        jobs_dir=tmp / "jobs",
        device="cpu",
        preload_models=False,
        job_lease_seconds=2,
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        yield Served(app, url, database_url)


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "PNG")
    return buf.getvalue()


def fail_once(
    monkeypatch: pytest.MonkeyPatch, engine: Any, method: str, error: BaseException
) -> list[int]:
    """Make `engine.method` raise `error` on its next call only; returns the call counter."""
    real = getattr(engine, method)
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, method, failing)
    return calls


ERRORS: dict[str, Callable[[], BaseException]] = {
    "runtime_error": lambda: RuntimeError("kernel failed at /srv/secret/model.pth"),
    "memory_error": MemoryError,
    "cuda_out_of_memory": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"),
}


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_engine_failure_is_a_json_error_and_not_charged(
    served: Served, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    secret = served.new_key()
    engine = served.app.state.context.registry.upscaler(MODEL)
    calls = fail_once(monkeypatch, engine, "_checked", ERRORS[error]())
    files = {"image": ("s.png", tiny_png(), "image/png")}
    with served.client(secret) as c:
        failed = c.post("/v1/upscale", files=files, data={"model": MODEL})
        assert calls, "the model was not reached"
        assert failed.status_code == 500, failed.text
        body = failed.json()["error"]
        assert body["code"] == "internal_error"
        assert body["request_id"] == failed.headers["X-Request-Id"]
        assert "secret" not in body["message"] and "GiB" not in body["message"]
        assert c.get("/v1/account").json()["credits"] == CREDITS

        ok = c.post("/v1/upscale", files=files, data={"model": MODEL})
        assert ok.status_code == 200, ok.text
        charged = int(ok.headers["X-Credits-Charged"])
        assert c.get("/v1/account").json()["credits"] == CREDITS - charged
    books = read_books(served.database_url)
    assert failed.headers["X-Request-Id"] not in books.usage
    assert books.usage[ok.headers["X-Request-Id"]] == charged
    assert metering.ledger_mismatches(served.app.state.db) == []


def test_batch_item_whose_engine_fails_once_runs_again_and_is_charged_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = served.new_key()
    engine = served.app.state.context.registry.upscaler(MODEL)
    calls = fail_once(monkeypatch, engine, "_checked", RuntimeError("transient device fault"))
    with served.client(secret) as c:
        r = c.post(
            "/v1/jobs",
            data={"operation": "upscale", "model": MODEL},
            files=[("files", ("s.png", tiny_png(), "image/png"))],
        )
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        view: dict[str, Any] = {}

        def done() -> bool:
            view.update(c.get(f"/v1/jobs/{job}").json())
            return view["status"] not in ("queued", "running")

        wait_for("the job finished", done, detail=lambda: view)
        assert view["status"] == "succeeded", view
        (item,) = view["items"]
        assert item["attempts"] == 2 and len(calls) >= 2
        assert c.get("/v1/account").json()["credits"] == CREDITS - item["credits"]
    assert metering.ledger_mismatches(served.app.state.db) == []
