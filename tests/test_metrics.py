"""GET /metrics over HTTP: request counts by route template, latency histograms, device queue
and inference times, credits captured and released, model loads, job items; the bearer token;
and what /readyz says about loaded models and missing weights."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgsvc.app import create_app
from imgsvc.config import Settings
from imgsvc.metrics import GpuMemoryCollector
from tests.utils import Server, linked_weights, photo_bytes, start_server, stop_server

TOKEN = "metrics-token-for-tests"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path
) -> Iterator[Server]:
    """A server of its own (its counters start at zero), models loaded on first use."""
    tmp = tmp_path_factory.mktemp("metrics")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(
        tmp,
        weights,
        IMGSVC_METRICS_TOKEN=TOKEN,
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
    )
    yield srv
    stop_server(srv)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def scrape(server: Server) -> Samples:
    r = httpx.get(f"{server.url}/metrics", headers=SCRAPE, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one histogram series, in bucket order."""
    found = []
    for (sample, labelset), count in samples.items():
        given = dict(labelset)
        le = given.pop("le", None)
        if sample == f"{name}_bucket" and given == labels and le is not None:
            found.append((float(le), count))
    return sorted(found)


def assert_histogram(samples: Samples, name: str, count: int, **labels: str) -> None:
    """`count` observations, consistent cumulative buckets ending in +Inf, a positive sum."""
    series = buckets(samples, name, **labels)
    assert series, f"no {name} series for {labels}"
    assert series[-1] == (float("inf"), count), series
    counts = [c for _, c in series]
    assert counts == sorted(counts), f"buckets not cumulative: {series}"
    assert value(samples, f"{name}_count", **labels) == count
    assert value(samples, f"{name}_sum", **labels) > 0


def test_metrics_need_the_token(metrics_server: Server) -> None:
    with httpx.Client(base_url=metrics_server.url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401, r.text
            error = r.json()["error"]
            assert error["code"] == "unauthorized"
            assert error["request_id"] == r.headers["X-Request-Id"]
            assert TOKEN not in r.text
        assert c.get("/metrics", headers=SCRAPE).status_code == 200
    samples = scrape(metrics_server)
    assert value(samples, "imgsvc_requests_total", route="/metrics", method="GET",
                 status="401", model="") == 3  # fmt: skip
    assert value(samples, "imgsvc_requests_total", route="/metrics", method="GET",
                 status="200", model="") >= 1  # fmt: skip


def test_calls_are_counted_timed_and_charged(metrics_server: Server) -> None:
    key = metrics_server.new_key(1000)
    small = Image.open(io.BytesIO(photo_bytes())).convert("RGB").resize((160, 120))
    blank = png(Image.new("RGB", (160, 120), "white"))
    before = scrape(metrics_server)
    with metrics_server.client(key) as c:
        cut = c.post("/v1/remove-background", files={"image": ("car.png", png(small))})
        assert cut.status_code == 200, cut.text
        quote = c.post("/v1/remove-background?dry_run=true", files={"image": ("b.png", blank)})
        assert quote.status_code == 200, quote.text
        empty = c.post("/v1/remove-background", files={"image": ("b.png", blank)})
        assert empty.status_code == 200 and empty.headers["X-Credits-Charged"] == "0"
        bad = c.post("/v1/remove-background", files={"image": ("x.png", b"not an image")})
        assert bad.status_code == 415, bad.text
        up = c.post(
            "/v1/upscale",
            files={"image": ("s.png", png(Image.new("RGB", (16, 16), "red")))},
            data={"model": "realesr-animevideov3"},
        )
        assert up.status_code == 200, up.text
        assert c.get("/v1/jobs/job_0123456789abcdef01234567").status_code == 404
        assert c.get("/no/such/path").status_code == 404
    unkeyed = httpx.post(f"{metrics_server.url}/v1/upscale", files={"image": ("s.png", blank)})
    assert unkeyed.status_code == 401
    samples = scrape(metrics_server)

    def requests(route: str, status: str, model: str = "", method: str = "POST") -> float:
        labels = {"route": route, "method": method, "status": status, "model": model}
        return value(samples, "imgsvc_requests_total", **labels) - value(
            before, "imgsvc_requests_total", **labels
        )

    assert requests("/v1/remove-background", "200", "u2netp") == 2
    assert requests("/v1/remove-background", "200") == 1  # the quote names no model
    assert requests("/v1/remove-background", "415") == 1
    assert requests("/v1/upscale", "200", "realesr-animevideov3") == 1
    assert requests("/v1/upscale", "401") == 1  # refused before routing: still its template
    assert requests("/v1/jobs/{job_id}", "404", method="GET") == 1
    assert requests("unmatched", "404", method="GET") == 1
    routes = {dict(labels).get("route") for (_, labels) in samples}
    assert not any("job_0123456789abcdef" in r or "/no/such" in r for r in routes if r)

    route = {"route": "/v1/remove-background", "method": "POST"}
    assert_histogram(samples, "imgsvc_request_duration_seconds", 4, **route)
    cutouts = {"operation": "remove-background", "model": "u2netp", "device": "cpu"}
    upscales = {"operation": "upscale", "model": "realesr-animevideov3", "device": "cpu"}
    for name in ("imgsvc_inference_seconds", "imgsvc_queue_wait_seconds"):
        assert_histogram(samples, name, 2, **cutouts)
        assert_histogram(samples, name, 1, **upscales)
    for op in ("remove-background", "upscale"):
        assert value(samples, "imgsvc_queue_depth", operation=op) == 0
        assert value(samples, "imgsvc_in_flight", operation=op) == 0
    for op, model in (("remove-background", "u2netp"), ("upscale", "realesr-animevideov3")):
        assert_histogram(samples, "imgsvc_model_load_seconds", 1, operation=op, model=model)

    def credits(name: str, operation: str) -> float:
        return value(samples, name, operation=operation) - value(before, name, operation=operation)

    charged = int(cut.headers["X-Credits-Charged"])
    assert charged > 0
    assert credits("imgsvc_credits_captured_total", "remove-background") == charged
    assert credits("imgsvc_credits_captured_total", "upscale") == int(
        up.headers["X-Credits-Charged"]
    )
    # The empty cut-out's whole hold came back; the other calls charged what they held.
    assert credits("imgsvc_credits_released_total", "remove-background") == quote.json()["credits"]
    assert credits("imgsvc_credits_released_total", "upscale") == 0
    assert not any(name.startswith("imgsvc_gpu_memory") for name, _ in samples)  # CPU only
    assert value(samples, "process_resident_memory_bytes") > 0


def test_job_items_by_outcome(metrics_server: Server) -> None:
    key = metrics_server.new_key(1000)
    small = png(Image.open(io.BytesIO(photo_bytes())).convert("RGB").resize((120, 90)))
    before = scrape(metrics_server)
    with metrics_server.client(key) as c:
        r = c.post(
            "/v1/jobs",
            data={"operation": "remove-background"},
            files=[("files", ("a.png", small, "image/png")), ("files", ("b.png", small))],
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    assert job["status"] == "succeeded", job
    samples = scrape(metrics_server)
    ran = value(samples, "imgsvc_job_items_total", outcome="succeeded") - value(
        before, "imgsvc_job_items_total", outcome="succeeded"
    )
    assert ran == 2
    cutouts = {"operation": "remove-background", "model": "u2netp", "device": "cpu"}
    waited = value(samples, "imgsvc_queue_wait_seconds_count", **cutouts) - value(
        before, "imgsvc_queue_wait_seconds_count", **cutouts
    )
    assert waited == 2  # job items take the same device slots as synchronous calls
    assert value(samples, "imgsvc_job_items_total", outcome="failed") == 0


def test_readyz_names_loaded_models_and_missing_weights(metrics_server: Server) -> None:
    key = metrics_server.new_key(100)
    small = png(Image.open(io.BytesIO(photo_bytes())).convert("RGB").resize((80, 60)))
    with metrics_server.client(key) as c:
        assert c.post("/v1/remove-background", files={"image": ("a.png", small)}).is_success
        body = c.get("/readyz").json()
    assert body["status"] == "ready" and body["device"] == "cpu"
    loaded = {(m["operation"], m["name"]) for m in body["models"]}
    assert ("remove-background", "u2netp") in loaded  # loaded by the call
    missing = {(m["operation"], m["name"]): m for m in body["missing_weights"]}
    assert missing[("remove-background", "u2net")]["path"] == "rembg/u2net.onnx"
    assert "u2net.onnx" in missing[("remove-background", "u2net")]["note"]
    assert ("inpaint", "lama") in missing
    assert ("remove-background", "u2netp") not in missing
    assert not any(op == "upscale" and name != "face_enhance" for op, name in missing)


def test_readyz_names_the_missing_default_upscale_weights(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        weights_dir=tmp_path / "weights",
        device="cpu",
        preload_models=False,
    )
    with TestClient(create_app(settings)) as client:
        body = client.get("/readyz").json()
    missing = {(m["operation"], m["name"]): m for m in body["missing_weights"]}
    assert missing[("upscale", "realesrgan-x4plus")]["path"] == (
        "upscale/realesrgan-x4plus.safetensors"
    )
    assert ("remove-background", "u2netp") in missing


def test_gpu_memory_is_collected_only_where_cuda_is_in_use() -> None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        assert list(GpuMemoryCollector().collect()) == []
    if not torch.cuda.is_available():
        pytest.skip("GPU memory is reported on CUDA only")
    torch.zeros(1, device="cuda")  # this process now uses CUDA
    families = {f.name: f for f in GpuMemoryCollector().collect()}
    [used] = families["imgsvc_gpu_memory_used_bytes"].samples
    [total] = families["imgsvc_gpu_memory_total_bytes"].samples
    assert used.labels == total.labels == {"gpu": str(torch.cuda.current_device())}
    assert 0 < used.value <= total.value
