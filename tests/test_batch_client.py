"""`imgsvc batch` and the jobs client against an in-process fake of the jobs API."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import io
import json
import re
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

from imgsvc import batch, client
from imgsvc.client import ApiError, Client

KEY = "isk_TESTKEYtestkey0123456789abcdefgh_zz"
API = "http://jobs.test"


class SimulatedCrash(BaseException):
    """The process dies right after the service took a submission."""


@dataclass
class Post:
    idempotency_key: str | None
    dry_run: bool
    names: list[str]
    replayed: bool = False


@dataclass
class FakeJobsApi:
    """The jobs API as documented: auth, quotes, idempotent submissions, polling, result zips."""

    price: int = 10
    polls_to_finish: int = 0
    crash_after_post: bool = False
    output_names: dict[str, str] = field(default_factory=dict)
    faults: list[tuple[str, httpx.Response | Exception]] = field(default_factory=list)
    on_post: Callable[[str], None] | None = None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    inputs: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    by_key: dict[str, tuple[str, str]] = field(default_factory=dict)
    posts: list[Post] = field(default_factory=list)
    seen: list[httpx.Request] = field(default_factory=list)
    charged: int = 0

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def real_posts(self) -> list[Post]:
        return [p for p in self.posts if not p.dry_run]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.faults and self.faults[0][0] == request.method:
            fault = self.faults.pop(0)[1]
            if isinstance(fault, Exception):
                raise fault
            return fault
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return error(401, "unauthorized", "missing or unknown key")
        path = request.url.path
        if request.method == "POST" and path == "/v1/jobs":
            return self.post(request)
        m = re.fullmatch(r"/v1/jobs/([^/]+)(/result)?", path)
        if request.method == "GET" and m and m.group(1) in self.jobs:
            job_id = m.group(1)
            if m.group(2):
                return self.result(job_id)
            self.poll(job_id)
            return httpx.Response(200, json=self.jobs[job_id])
        return error(404, "not_found", f"no {path}")

    def post(self, request: httpx.Request) -> httpx.Response:
        fields, files = parse_form(request)
        operation = fields.pop("operation")
        webhook = fields.pop("webhook_url", None)
        dry_run = request.url.params.get("dry_run") == "true"
        key = request.headers.get("idempotency-key")
        record = Post(key, dry_run, [name for name, _ in files])
        self.posts.append(record)
        if dry_run:
            ok = [n for n, _ in files if "broken" not in n]
            failed = [
                {"item": i, "name": n, "error": {"code": "invalid_image", "message": "corrupt"}}
                for i, (n, _) in enumerate(files, 1)
                if "broken" in n
            ]
            quote = {"operation": operation, "items": len(files), "credits": self.price * len(ok)}
            return httpx.Response(200, json={**quote, "price_version": "t", "failed": failed})
        if self.on_post is not None and key is not None:
            self.on_post(key)
        fingerprint = json.dumps(
            [operation, sorted(fields.items()), webhook, sorted((n, sha(b)) for n, b in files)]
        )
        headers = {"X-Request-Id": f"req_{len(self.seen)}"}
        if key is not None and key in self.by_key:
            stored, job_id = self.by_key[key]
            if stored != fingerprint:
                return error(422, "idempotency_key_reused", "another request had this key")
            record.replayed = True
            headers["Idempotent-Replayed"] = "true"
        else:
            job_id = self.create(operation, files)
            if key is not None:
                self.by_key[key] = (fingerprint, job_id)
        if self.crash_after_post:
            raise SimulatedCrash
        headers["Location"] = f"/v1/jobs/{job_id}"
        return httpx.Response(202, json=self.jobs[job_id], headers=headers)

    def create(self, operation: str, files: list[tuple[str, bytes]]) -> str:
        job_id = f"job_{len(self.jobs) + 1:04d}"
        n = len(files)
        self.jobs[job_id] = {
            "id": job_id,
            "operation": operation,
            "status": "queued",
            "progress": {"total": n, "queued": n, "running": 0, "succeeded": 0, "failed": 0,
                         "canceled": 0},
            "credits": {"quoted": self.price * n, "charged": 0},
            "queue_position": 1,
            "result_url": f"/v1/jobs/{job_id}/result",
            "items": [
                {"item": i, "name": name, "status": "queued", "credits": 0, "error": None,
                 "output_name": None, "url": f"/v1/jobs/{job_id}/items/{i}"}
                for i, (name, _) in enumerate(files, 1)
            ],
        }  # fmt: skip
        self.inputs[job_id] = files
        self.polls[job_id] = 0
        if self.polls_to_finish == 0:
            self.finish(job_id)
        return job_id

    def poll(self, job_id: str) -> None:
        self.polls[job_id] += 1
        job = self.jobs[job_id]
        if job["status"] == "queued" and self.polls[job_id] >= self.polls_to_finish:
            self.finish(job_id)

    def finish(self, job_id: str) -> None:
        job = self.jobs[job_id]
        outputs: dict[str, bytes] = {}
        for item, (name, content) in zip(job["items"], self.inputs[job_id], strict=True):
            if "broken" in name:
                item.update(status="failed", error={"code": "invalid_image", "message": "bad"})
                continue
            out_name = self.output_names.get(name, str(PurePosixPath(name).with_suffix(".png")))
            item.update(status="succeeded", credits=self.price, output_name=out_name)
            outputs[out_name] = b"out:" + content
        done = sum(1 for i in job["items"] if i["status"] == "succeeded")
        failed = len(job["items"]) - done
        self.charged += self.price * done
        job["credits"]["charged"] = self.price * done
        job["progress"].update(queued=0, succeeded=done, failed=failed)
        job["queue_position"] = None
        job["status"] = "succeeded" if not failed else "partially_failed" if done else "failed"
        self.outputs[job_id] = outputs

    def result(self, job_id: str) -> httpx.Response:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as archive:
            for name, content in self.outputs[job_id].items():
                archive.writestr(name, content)
            archive.writestr("manifest.csv", "item,name\n")
            archive.writestr("manifest.json", json.dumps({"job": job_id}))
        return httpx.Response(
            200, content=buf.getvalue(), headers={"Content-Type": "application/zip"}
        )


def error(status: int, code: str, message: str, **extra: Any) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "request_id": "req_fake", **extra}}
    return httpx.Response(status, json=body, headers={"X-Request-Id": "req_fake"})


def parse_form(request: httpx.Request) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """multipart/form-data → (fields, [(filename, bytes)] of the `files` parts)."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.read())
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if name == "files":
            files.append((str(part.get_filename()), payload))
        else:
            fields[str(name)] = payload.decode()
    return fields, files


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "POLL_S", 0.0)
    monkeypatch.delenv("IMGSVC_API_KEY", raising=False)
    monkeypatch.delenv("IMGSVC_API_URL", raising=False)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """photos/a.jpg, b.PNG, shoes/c.jpg, shoes/d.webp, e.tiff (and a text file, ignored)."""
    root = tmp_path / "photos"
    (root / "shoes").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "shoes/c.jpg", "shoes/d.webp", "e.tiff"):
        (root / name).write_bytes(f"image {name}".encode())
    (root / "notes.txt").write_text("not an image")
    return root


def run_batch(fake: FakeJobsApi, *argv: str | Path) -> int:
    parser = argparse.ArgumentParser()
    batch.add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["batch", *map(str, argv), "--key", KEY, "--api-url", API])
    return batch.run(args, None, transport=fake.transport)


def state_of(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / batch.STATE_NAME).read_text())
    return data


def test_chunks_are_planned_and_recorded_before_each_post(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeJobsApi()
    recorded_at_post: list[dict[str, Any]] = []

    def check_state(key: str) -> None:
        chunks = {c["idempotency_key"]: c for c in state_of(out)["chunks"]}
        assert key in chunks, "the key must be on disk before the service sees it"
        recorded_at_post.append(chunks[key])

    fake.on_post = check_state
    code = run_batch(fake, "upscale", photos, "--out", out, "--chunk-size", "2", "--option",
                     "scale=2")  # fmt: skip
    assert code == 0
    assert [p.names for p in fake.real_posts()] == [
        ["a.jpg", "b.PNG"],
        ["e.tiff", "shoes/c.jpg"],
        ["shoes/d.webp"],
    ]
    assert all(c["job_id"] is None for c in recorded_at_post)
    sent = recorded_at_post[0]["files"]
    assert sent == [
        {"name": "a.jpg", "sha256": sha(b"image a.jpg")},
        {"name": "b.PNG", "sha256": sha(b"image b.PNG")},
    ]
    state = state_of(out)
    assert state["operation"] == "upscale" and state["options"] == {"scale": "2"}
    assert [c["job_id"] for c in state["chunks"]] == ["job_0001", "job_0002", "job_0003"]
    assert all(c["downloaded"] for c in state["chunks"])
    assert len({c["idempotency_key"] for c in state["chunks"]}) == 3
    assert (out / "shoes" / "c.png").read_bytes() == b"out:image shoes/c.jpg"
    assert (out / "b.png").exists()
    assert json.loads((out / ".imgsvc-manifests" / "job_0001.json").read_text()) == {
        "job": "job_0001"
    }
    assert not (out / "manifest.csv").exists() and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".imgsvc-")) == [
        ".imgsvc-batch.json",
        ".imgsvc-manifests",
    ]


def test_resume_after_a_crash_after_post_reuses_the_key(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    fake = FakeJobsApi(crash_after_post=True)
    with pytest.raises(SimulatedCrash):
        run_batch(fake, "remove-background", photos / "a.jpg", photos / "b.PNG", "--out", out)
    (chunk,) = state_of(out)["chunks"]
    assert chunk["job_id"] is None and len(fake.jobs) == 1 and fake.charged == 20

    fake.crash_after_post = False
    assert (
        run_batch(fake, "remove-background", photos / "a.jpg", photos / "b.PNG", "--out", out) == 0
    )
    first, second = fake.real_posts()
    assert first.idempotency_key == second.idempotency_key == chunk["idempotency_key"]
    assert second.replayed
    assert len(fake.jobs) == 1 and fake.charged == 20, "the retry must not charge again"
    assert sum(p.dry_run for p in fake.posts) == 1, "a confirmed chunk is not quoted again"
    assert state_of(out)["chunks"][0]["job_id"] == "job_0001"
    assert (out / "a.png").exists() and (out / "b.png").exists()
    assert "credits charged: 20" in capsys.readouterr().out


def test_changed_file_in_an_unfinished_chunk_is_planned_anew(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeJobsApi(crash_after_post=True)
    with pytest.raises(SimulatedCrash):
        run_batch(fake, "upscale", photos / "a.jpg", "--out", out)
    (photos / "a.jpg").write_bytes(b"edited")
    fake.crash_after_post = False
    assert run_batch(fake, "upscale", photos / "a.jpg", "--out", out) == 0
    first, second = fake.real_posts()
    assert first.idempotency_key != second.idempotency_key
    assert (out / "a.png").read_bytes() == b"out:edited"


def test_existing_outputs_are_skipped(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / "shoes").mkdir(parents=True)
    (out / "a.webp").write_bytes(b"done before")  # any extension counts
    (out / "shoes" / "c.png").write_bytes(b"done before")
    (out / "e.tiff.png").write_bytes(b"not the output of e.tiff")
    fake = FakeJobsApi()
    assert run_batch(fake, "upscale", photos, "--out", out) == 0
    assert [p.names for p in fake.real_posts()] == [["b.PNG", "e.tiff", "shoes/d.webp"]]
    assert (out / "a.webp").read_bytes() == b"done before"
    assert "skipped (output exists): 2" in capsys.readouterr().out

    # A rerun has nothing left to do; an input edited since its output was saved is redone.
    assert run_batch(fake, "upscale", photos, "--out", out) == 0
    assert len(fake.real_posts()) == 1
    (photos / "b.PNG").write_bytes(b"edited")
    assert run_batch(fake, "upscale", photos, "--out", out) == 0
    assert fake.real_posts()[-1].names == ["b.PNG"]
    assert (out / "b.png").read_bytes() == b"out:edited"


def test_reprocess_existing_sends_everything_with_a_fresh_state(
    photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"old")
    stale = batch.State("inpaint", {}, None, [batch.Chunk("old-key", {"zzz.jpg": "0" * 64})])
    stale.save(out / batch.STATE_NAME)
    fake = FakeJobsApi()
    assert run_batch(fake, "upscale", photos, "--out", out, "--reprocess-existing") == 0
    (post,) = fake.real_posts()
    assert "a.jpg" in post.names and len(post.names) == 5
    assert (out / "a.png").read_bytes() == b"out:image a.jpg"
    keys = [c["idempotency_key"] for c in state_of(out)["chunks"]]
    assert keys == [post.idempotency_key] and "old-key" not in keys


def test_unfinished_batch_of_another_command_is_refused(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeJobsApi(crash_after_post=True)
    with pytest.raises(SimulatedCrash):
        run_batch(fake, "upscale", photos / "a.jpg", "--out", out)
    fake.crash_after_post = False
    assert run_batch(fake, "upscale", photos / "a.jpg", "--out", out, "--option", "scale=3") == 2
    assert len(fake.real_posts()) == 1


def test_quote_over_the_limit_without_a_terminal_spends_nothing(
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal, even saying yes
    out = tmp_path / "out"
    fake = FakeJobsApi()
    code = run_batch(fake, "upscale", photos, "--out", out, "--confirm-over", "49", "--chunk-size",
                     "3")  # fmt: skip
    assert code == 3
    assert [p.dry_run for p in fake.posts] == [True, True]
    assert fake.jobs == {} and fake.charged == 0
    assert not (out / batch.STATE_NAME).exists()
    assert "Spend 50 credits on 5 images" in capsys.readouterr().err

    assert run_batch(fake, "upscale", photos, "--out", out, "--confirm-over", "49", "--yes") == 0
    assert fake.charged == 50


def test_failed_items_are_reported_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jpg").write_bytes(b"g")
    (src / "broken.jpg").write_bytes(b"b")
    fake = FakeJobsApi(polls_to_finish=2)
    assert run_batch(fake, "upscale", src, "--out", tmp_path / "out") == 1
    printed = capsys.readouterr()
    assert "failed: 1\n  broken.jpg: invalid_image" in printed.out
    assert "succeeded: 1" in printed.out and "credits charged: 10" in printed.out
    assert "2/2 done, 1 failed, 10 credits charged" in printed.err


def test_unpack_refuses_traversal_absolute_and_backslash_names(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    zip_path = tmp_path / "result.zip"
    bad = ["../x.png", "/abs.png", "a/../../y.png", "dir\\z.png", "C:/w.png", ".imgsvc-batch.json"]
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in [*bad, "ok/fine.png", "extra.png", "manifest.json"]:
            archive.writestr(name, b"x")
    written, refused = batch.unpack_result(
        zip_path, out, [*bad, "ok/fine.png"], out / ".imgsvc-manifests" / "job_1.json"
    )
    assert written == {"ok/fine.png"}
    assert sorted(refused) == sorted([*bad, "extra.png"])
    assert not (tmp_path / "deep" / "x.png").exists() and not (tmp_path / "y.png").exists()
    assert not Path("/abs.png").exists() and not (out / batch.STATE_NAME).exists()
    assert (out / ".imgsvc-manifests" / "job_1.json").exists()


def test_a_job_naming_an_output_outside_out_is_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"a")
    fake = FakeJobsApi(output_names={"a.jpg": "../evil.png"})
    assert run_batch(fake, "upscale", src, "--out", tmp_path / "out") == 1
    assert not (tmp_path / "evil.png").exists()
    assert "a.jpg: output_refused" in capsys.readouterr().out


def test_503_is_retried_after_retry_after_with_the_same_key() -> None:
    waits: list[float] = []
    busy = error(503, "queue_full", "busy")
    busy.headers["Retry-After"] = "0.05"
    fake = FakeJobsApi(faults=[("POST", busy), ("GET", httpx.ConnectError("refused"))])
    with Client(API, KEY, transport=fake.transport, sleep=waits.append) as api:
        job = api.submit_job("upscale", [("a.jpg", b"a")], options={"scale": "2"})
        assert api.job(job.id).status == "succeeded"
    posts = [r for r in fake.seen if r.method == "POST"]
    assert len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert len(posts[0].headers["idempotency-key"]) <= 255
    assert 0.05 <= waits[0] <= 0.2, "Retry-After is honoured, with a little jitter"
    assert len(waits) == 2 and len(fake.jobs) == 1


def test_retry_after_is_capped_and_retries_end() -> None:
    policy = client.RetryPolicy(max_attempts=3, max_retry_after=5.0)
    assert 5.0 <= (policy.delay(0, 3600.0) or 0) <= 5.6
    assert policy.delay(2, 1.0) is None
    assert client.parse_retry_after("7") == 7.0 and client.parse_retry_after("soon") is None


def test_api_error_has_code_message_request_id_and_never_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    poor = error(402, "insufficient_credits", "top up", credits_required=50, credits_remaining=3)
    fake = FakeJobsApi(faults=[("POST", poor)])
    with Client(API, KEY, transport=fake.transport) as api, pytest.raises(ApiError) as caught:
        api.quote_job("upscale", [("a.jpg", b"a")])
    exc = caught.value
    assert (exc.status, exc.code, exc.message) == (402, "insufficient_credits", "top up")
    assert exc.request_id == "req_fake"
    assert exc.details == {"credits_required": 50, "credits_remaining": 3}
    assert exc.__cause__ is None

    down = FakeJobsApi(faults=[("GET", httpx.ConnectError(f"refused Bearer {KEY}"))] * 3)
    with Client(API, KEY, max_attempts=3, transport=down.transport, sleep=lambda s: None) as api:
        with pytest.raises(ApiError) as caught_down:
            api.job("job_1")
        assert KEY not in repr(api)
    assert caught_down.value.status == 0 and caught_down.value.code == "connection_error"
    for e in (exc, caught_down.value):
        assert KEY not in f"{e} {e!r} {e.args} {e.details} {e.message}"

    src = tmp_path / "a.jpg"
    src.write_bytes(b"a")
    assert run_batch(FakeJobsApi(faults=[("POST", poor)]), "upscale", src, "--out",
                     tmp_path / "out") == 4  # fmt: skip
    err = capsys.readouterr().err
    assert "insufficient_credits" in err and "top up" in err and "req_fake" in err
    assert "credits required: 50" in err and KEY not in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    fake = FakeJobsApi()
    assert run_batch(fake, "upscale", empty, "--out", tmp_path / "out") == 2
    assert "no images" in capsys.readouterr().err
    (empty / "a.jpg").write_bytes(b"a")
    assert run_batch(fake, "upscale", empty, "--out", tmp_path / "out", "--option", "scale") == 2
    assert run_batch(fake, "upscale", empty, "--out", tmp_path / "o", "--option", "files=x") == 2
    (empty / "a.png").write_bytes(b"a")
    assert run_batch(fake, "upscale", empty, "--out", tmp_path / "out") == 2
    assert "would both be saved as a.<extension>" in capsys.readouterr().err
    assert fake.posts == []


def test_ctrl_c_while_waiting_exits_130_and_resumes(
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    fake = FakeJobsApi(polls_to_finish=3)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    monkeypatch.setattr(sys, "argv", ["imgsvc", "batch", "upscale", "--key", KEY])
    assert run_batch(fake, "upscale", photos, "--out", out) == 130
    err = capsys.readouterr().err
    assert "Run the same command again to resume" in err and KEY not in err
    assert state_of(out)["chunks"][0]["job_id"] == "job_0001"

    monkeypatch.undo()
    monkeypatch.setattr(batch, "POLL_S", 0.0)
    assert run_batch(fake, "upscale", photos, "--out", out) == 0
    assert len(fake.real_posts()) == 1 and len(fake.jobs) == 1
    assert (out / "shoes" / "d.png").exists()
