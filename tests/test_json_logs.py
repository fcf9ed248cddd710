"""Structured logs: with IMGSVC_LOG_FORMAT=json each request is one JSON line with its facts and
never a secret; `auto` picks text on a terminal and JSON elsewhere; `text` stays plain."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgsvc import logs
from tests.utils import Server, linked_weights, photo_bytes, start_server, stop_server

REQUEST_FIELDS = {"ts", "level", "request_id", "key_id", "method", "route", "status", "model"}
REQUEST_FIELDS |= {"duration_ms", "credits"}


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("json-logs")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    srv = start_server(tmp, weights, IMGSVC_LOG_FORMAT="json", IMGSVC_PRELOAD_MODELS="false")
    yield srv
    stop_server(srv)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def request_lines(server: Server, request_id: str) -> list[dict[str, Any]]:
    """The log lines of one request, once it has been logged (just after its response)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            e
            for e in json_lines(server.log.read_text())
            if e.get("logger") == "imgsvc.access" and e.get("request_id") == request_id
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_request_is_one_json_line_without_secrets(json_server: Server) -> None:
    key = json_server.new_key(100)
    img = Image.open(io.BytesIO(photo_bytes())).convert("RGB").resize((120, 90))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with json_server.client(key) as c:
        r = c.post(
            "/v1/remove-background",
            files={"image": ("car.png", buf.getvalue(), "image/png")},
            headers={"X-Request-Id": "json-logs-cutout"},
        )
        assert r.status_code == 200, r.text
        key_id = c.get("/v1/usage").json()["data"][0]["key_id"]
        refused = c.get("/v1/account", headers={"Authorization": f"Bearer {key}x"})
        assert refused.status_code == 401
    [line] = request_lines(json_server, "json-logs-cutout")
    assert line.keys() >= REQUEST_FIELDS
    assert line["level"] == "info"
    assert datetime.fromisoformat(line["ts"]).tzinfo is not None
    assert line["key_id"] == key_id
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/remove-background", 200)
    assert line["model"] == "u2netp"
    assert line["credits"] == int(r.headers["X-Credits-Charged"]) > 0
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0

    [denied] = request_lines(json_server, refused.headers["X-Request-Id"])
    assert (denied["status"], denied["key_id"], denied["credits"]) == (401, None, 0)
    assert denied["route"] == "/v1/account"

    log = json_server.log.read_text()
    assert key not in log and key[:-1] not in log and key[4:] not in log
    assert '"POST /v1/remove-background HTTP/1.1"' not in log  # no second (access) line
    started = [e for e in json_lines(log) if e["logger"].startswith("uvicorn")]
    assert any("Uvicorn running on" in e["message"] for e in started)
    assert not any("color_message" in e for e in started)  # no terminal colour codes


def test_auto_is_text_on_a_terminal_json_elsewhere() -> None:
    assert logs.resolve("auto", io.StringIO()) == "json"
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as _, os.fdopen(write_end, "w") as pipe:
        assert logs.resolve("auto", pipe) == "json"
    leader, follower = os.openpty()
    with os.fdopen(leader) as _, os.fdopen(follower, "w") as terminal:
        assert logs.resolve("auto", terminal) == "text"
        assert logs.resolve("json", terminal) == "json"
    assert logs.resolve("text", io.StringIO()) == "text"


def test_json_lines_carry_extra_fields_and_tracebacks() -> None:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        record = logging.getLogger("imgsvc.test").makeRecord(
            "imgsvc.test", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info(),
            extra={"request_id": "req_1", "status": 500},
        )  # fmt: skip
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "failed here" and entry["level"] == "error"
    assert (entry["request_id"], entry["status"]) == ("req_1", 500)
    assert "ZeroDivisionError" in entry["exc"]
    assert "args" not in entry and "msg" not in entry


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_cli_logs_in_the_chosen_format(tmp_path: Path, log_format: str) -> None:
    env = {
        **os.environ,
        "IMGSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "IMGSVC_LOG_FORMAT": log_format,
    }
    done = subprocess.run(
        [sys.executable, "-m", "imgsvc", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, "the database migration logs something"
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert all(e["level"] == "info" and e["logger"] and e["ts"] for e in entries)
    else:
        assert not any(line.startswith("{") for line in lines)
        assert all(" INFO " in line for line in lines)
    assert done.stdout.startswith("id\tname")  # stdout is the command's own output
