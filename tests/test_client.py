"""imgsvc.client against the real server over HTTP: operations, jobs, account, errors, retries;
the synchronous and the asynchronous client alike."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imgsvc import client as api
from imgsvc.client import (
    ApiConnectionError,
    ApiError,
    AsyncClient,
    AuthenticationError,
    Client,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from tests.utils import DATA, SECRETS, Server

CAR, MASK, CROP = DATA / "car.jpg", DATA / "car-mask.png", DATA / "photo_crop.png"


def small_png(size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def cli_key(server: Server, *args: str) -> str:
    """`imgsvc keys create ARGS`: the new key (checked to be in no server log at the end)."""
    key = server.cli("keys", "create", *args).splitlines()[-1]
    SECRETS.add(key)
    return key


class Recording(httpx.BaseTransport):
    """The real transport, remembering each answer's method, path, status and Retry-After."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str, int, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.seen.append(
            (
                request.method,
                request.url.path,
                response.status_code,
                response.headers.get("retry-after"),
            )
        )
        return response

    def close(self) -> None:
        self.inner.close()


def test_remove_background_from_a_path_bytes_or_a_url(server: Server, origin: str) -> None:
    key = server.new_key(100)
    with Client(server.url, key) as imgsvc:
        cutout = imgsvc.remove_background(CAR, format="png", client_ref="order-7")
        img = Image.open(io.BytesIO(cutout.content))
        assert (img.mode, img.size) == ("RGBA", (480, 360))
        assert cutout.content_type == "image/png"
        assert (cutout.width, cutout.height, cutout.model) == (480, 360, "u2netp")
        assert cutout.credits_charged == 10 and cutout.credits_remaining == 90
        assert cutout.request_id and cutout.request_id.startswith("req_")
        assert not cutout.replayed

        on_white = imgsvc.remove_background(CAR.read_bytes(), bg_color="white", format="jpg")
        assert on_white.content_type == "image/jpeg" and on_white.credits_remaining == 80
        preview = imgsvc.remove_background(CAR, size="preview")
        assert preview.credits_charged == 3  # the preview price
        # A URL goes as `image_url`, fetched by the service, which refuses a loopback address.
        with pytest.raises(InvalidRequest) as caught:
            imgsvc.remove_background(f"{origin}/car.jpg")
        assert caught.value.code == "url_not_allowed" and "image_url" in caught.value.message

        rows = imgsvc.usage().data
        assert [r.request_id for r in rows] == [
            preview.request_id,
            on_white.request_id,
            cutout.request_id,
        ]
        assert rows[-1].client_ref == "order-7" and rows[-1].credits == 10
        assert imgsvc.account().credits == 100 - 10 - 10 - 3


def test_upscale_erase_and_prompt_inpaint(server: Server) -> None:
    key = server.new_key(200)
    with Client(server.url, key) as imgsvc:
        bigger = imgsvc.upscale(small_png(), scale=2, format="webp")
        assert Image.open(io.BytesIO(bigger.content)).size == (48, 32)
        assert bigger.content_type == "image/webp" and bigger.credits_charged == 2

        erased = imgsvc.erase(CAR, MASK)
        assert erased.model == "opencv-telea" and erased.credits_charged == 10
        assert Image.open(io.BytesIO(erased.content)).size == (480, 360)

        painted = imgsvc.inpaint(CAR, MASK, prompt="a red car", steps=2, seed=7, format="png")
        assert painted.seed == 7 and painted.model == "tiny-sd-inpaint"
        assert painted.credits_charged > 0
        assert painted.credits_remaining == 200 - 2 - 10 - painted.credits_charged

        boxed = imgsvc.erase(CAR, mask_boxes=[[10, 10, 40, 30]], grow_mask=2)
        assert boxed.credits_charged == 10

        quote = imgsvc.quote("upscale", 512, 512, scale=4)
        assert (quote.output_width, quote.output_height, quote.credits) == (2048, 2048, 42)
        assert quote.exact
        assert not imgsvc.quote("inpaint", 512, 512, prompt=True, steps=4).exact


def test_jobs_submit_wait_download_list_and_cancel(
    server: Server, tmp_path: Path, origin: str
) -> None:
    key = server.new_key(100)
    files = [("shop/a.png", small_png()), ("shop/b.png", small_png((20, 20)))]
    with Client(server.url, key) as imgsvc:
        archive_bytes = io.BytesIO()
        with zipfile.ZipFile(archive_bytes, "w") as archive:
            for name, content in files:
                archive.writestr(name, content)
        by_zip = imgsvc.quote_job(
            "upscale", zip_file=archive_bytes.getvalue(), options={"scale": 2}
        )
        assert (by_zip.items, by_zip.credits, by_zip.failed) == (2, 4, [])
        # URLs go as JSON; the service refuses a loopback address item by item, and a job
        # without any valid item whole (422, the failures listed).
        with pytest.raises(InvalidRequest) as refused:
            imgsvc.submit_job("upscale", urls=[f"{origin}/car.jpg"], options={"scale": 2})
        assert refused.value.details["failed"][0]["error"]["code"] == "url_not_allowed"

        quote = imgsvc.quote_job("upscale", [*files, ("bad.png", b"not an image")],
                                 options={"scale": 2})  # fmt: skip
        assert (quote.items, quote.credits) == (2, 4)
        assert [(f.item, f.name, f.code) for f in quote.failed] == [
            (3, "bad.png", "unsupported_media_type")
        ]
        assert imgsvc.account().credits == 100, "a quote holds nothing"

        job = imgsvc.submit_job("upscale", files, options={"scale": 2}, client_ref="batch-1")
        assert job.status in ("queued", "running", "succeeded") and job.progress.total == 2
        seen: list[api.Job] = []
        done = imgsvc.wait(job.id, progress=seen.append, poll_interval=0.1, timeout=120)
        assert done.status == "succeeded" and done.finished and done.credits_charged == 4
        assert seen[-1] == done and all(j.id == job.id for j in seen)
        assert [(i.name, i.output_name, i.status) for i in done.items] == [
            ("shop/a.png", "shop/a.png", "succeeded"),
            ("shop/b.png", "shop/b.png", "succeeded"),
        ]

        path = imgsvc.download_result(job.id, tmp_path / "out" / "result.zip")
        with zipfile.ZipFile(path) as archive:
            assert {"shop/a.png", "shop/b.png", "manifest.csv"} <= set(archive.namelist())
            assert Image.open(io.BytesIO(archive.read("shop/b.png"))).size == (40, 40)
        assert not [p for p in path.parent.iterdir() if p.name != "result.zip"]
        assert Image.open(io.BytesIO(imgsvc.item_output(job.id, 1))).size == (48, 32)

        assert [j.id for j in imgsvc.jobs(limit=5)] == [job.id]
        assert imgsvc.cancel(job.id).status == "succeeded"  # finished: nothing to cancel
        assert imgsvc.account().credits == 96
        refs = {r.client_ref for r in imgsvc.usage().data}
        assert refs == {"batch-1"}


def test_async_client_does_what_the_sync_one_does(server: Server, tmp_path: Path) -> None:
    key = server.new_key(100)

    async def scenario() -> None:
        async with AsyncClient(server.url, key) as imgsvc:
            first, second = await asyncio.gather(
                imgsvc.upscale(small_png(), scale=2), imgsvc.erase(CAR, MASK)
            )
            assert first.credits_charged == 2 and second.credits_charged == 10
            job = await imgsvc.submit_job("upscale", [("x.png", small_png())],
                                          options={"scale": 3})  # fmt: skip
            polled: list[str] = []

            async def progress(j: api.Job) -> None:
                polled.append(j.status)

            done = await imgsvc.wait(job.id, progress=progress, poll_interval=0.1, timeout=120)
            assert done.status == "succeeded" and polled[-1] == "succeeded"
            path = await imgsvc.download_result(job.id, tmp_path / "async.zip")
            assert zipfile.ZipFile(path).namelist()[0] == "x.png"
            account = await imgsvc.account()
            assert account.credits == 100 - 2 - 10 - done.credits_charged
            summary = await imgsvc.usage_summary(group_by="operation")
            assert {g.group: g.calls for g in summary.data} == {"upscale": 2, "inpaint": 1}
            assert summary.total_credits == 100 - account.credits
            with pytest.raises(NotFound) as caught:
                await imgsvc.job("job_" + "0" * 24)
            assert caught.value.code == "not_found" and caught.value.request_id

    asyncio.run(scenario())


def test_errors_are_typed_with_code_message_and_request_id(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at these levels

    def raised(call: Callable[[], object]) -> ApiError:
        with pytest.raises(ApiError) as caught:
            call()
        exc = caught.value
        assert exc.code and exc.message and exc.request_id, exc
        assert exc.request_id.startswith("req_")
        return exc

    bad_key = "isk_" + "a" * 32 + "_AAAAAA"
    SECRETS.add(bad_key)
    with Client(server.url, bad_key) as anon:
        exc = raised(anon.account)
        assert isinstance(exc, AuthenticationError)
        assert (exc.status, exc.code) == (401, "unauthorized")
        assert bad_key not in f"{exc} {exc!r} {exc.args} {anon!r}"

    broke = server.new_key(0)
    with Client(server.url, broke) as imgsvc:
        exc = raised(lambda: imgsvc.remove_background(CAR))
        assert isinstance(exc, InsufficientCredits) and exc.status == 402
        assert exc.code == "insufficient_credits" and exc.details["credits_required"] == 10

    upscale_only = cli_key(server, "--name", "scoped", "--credits", "50", "--scopes", "upscale")
    with Client(server.url, upscale_only) as imgsvc:
        exc = raised(lambda: imgsvc.remove_background(CAR))
        assert isinstance(exc, PermissionDenied) and (exc.status, exc.code) == (403, "forbidden")
        exc = raised(imgsvc.sub_keys)
        assert isinstance(exc, PermissionDenied)
        exc = raised(lambda: imgsvc.job("job_" + "f" * 24))
        assert isinstance(exc, NotFound) and exc.status == 404
        exc = raised(lambda: imgsvc.upscale(small_png(), scale=9))
        assert isinstance(exc, InvalidRequest) and (exc.status, exc.code) == (
            422,
            "invalid_request",
        )
        exc = raised(lambda: imgsvc.upscale(b"this is not an image"))
        assert isinstance(exc, UnsupportedMediaType) and isinstance(exc, InvalidRequest)
        assert (exc.status, exc.code) == (415, "unsupported_media_type")
        assert imgsvc.account().credits == 50, "no error is charged"
        assert imgsvc.usage().data == []
    assert "HTTP Request: POST" in caplog.text
    for secret in (bad_key, broke, upscale_only):
        assert secret not in caplog.text


def test_429_waits_for_retry_after_then_succeeds(server: Server) -> None:
    key = cli_key(server, "--name", "slow", "--credits", "10", "--rate-limit", "1/4 seconds")
    recording = Recording()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    files = [("a.png", small_png())]
    with Client(server.url, key, transport=recording, sleep=sleep) as imgsvc:
        assert imgsvc.quote_job("upscale", files).credits == 2  # uses the window's one call
        assert imgsvc.quote_job("upscale", files).credits == 2  # refused once, then let in
    statuses = [status for _, _, status, _ in recording.seen]
    assert statuses == [200, 429, 200], recording.seen
    retry_after = recording.seen[1][3]
    assert retry_after is not None and 1 <= int(retry_after) <= 4
    assert len(waits) == 1 and int(retry_after) <= waits[0] <= int(retry_after) * 1.1 + 0.06

    with Client(server.url, key, max_attempts=1) as impatient, pytest.raises(RateLimited) as caught:
        impatient.quote_job("upscale", files)
    assert caught.value.status == 429 and caught.value.code == "rate_limited"
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    assert caught.value.request_id


def test_the_sync_and_async_clients_offer_the_same_calls() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_") and name not in ("close", "aclose")
        }

    sync, aio = public(Client), public(AsyncClient)
    assert sync.keys() == aio.keys()
    for name, signature in sync.items():
        assert str(signature) == str(aio[name]), name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
    assert {"remove_background", "upscale", "inpaint", "erase", "quote", "submit_job",
            "quote_job", "job", "jobs", "wait", "download_result", "cancel", "account",
            "usage", "usage_summary", "usage_csv", "statement", "statement_csv",
            "create_sub_key", "sub_keys", "revoke_sub_key"} <= sync.keys()  # fmt: skip


def test_sub_keys_statements_and_csv(server: Server) -> None:
    reseller = cli_key(server, "--name", "agency", "--credits", "100", "--reseller")
    with Client(server.url, reseller) as imgsvc:
        made = imgsvc.create_sub_key("client-a", monthly_cap=15, scopes=["inpaint"])
        SECRETS.add(made.key)
        assert made.key.startswith("isk_") and made.key not in repr(made)
        assert made.info.monthly_cap == 15 and made.info.scopes == ["inpaint"]
        with Client(server.url, made.key) as child:
            assert child.erase(CAR, MASK).credits_remaining == 90
            with pytest.raises(InsufficientCredits) as caught:
                child.erase(CAR, MASK)  # 10 more would pass the cap of 15
            assert caught.value.code == "monthly_cap_reached"
        assert [(k.name, k.month_spent) for k in imgsvc.sub_keys()] == [("client-a", 10)]
        assert len(imgsvc.sub_key_usage(made.info.id).data) == 1

        month = imgsvc.usage().data[0].created_at
        assert month is not None
        statement = imgsvc.statement(f"{month:%Y-%m}")
        assert (statement.total_calls, statement.total_credits) == (1, 10)
        csv_lines = imgsvc.statement_csv(f"{month:%Y-%m}").strip().splitlines()
        assert len(csv_lines) == 2 and "request_id" in csv_lines[0]
        assert len(imgsvc.usage_csv(operation="inpaint").strip().splitlines()) == 2
        assert imgsvc.usage_csv(operation="upscale").strip().count("\n") == 0

        assert imgsvc.revoke_sub_key(made.info.id).id == made.info.id
        assert imgsvc.sub_keys() == []
    with Client(server.url, made.key) as child, pytest.raises(AuthenticationError):
        child.account()


# -- retry decisions, without a server -----------------------------------------------------------


def test_a_post_without_idempotency_is_not_repeated_after_a_503() -> None:
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        body = {"error": {"code": "busy", "message": "later", "request_id": "req_x"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0"})

    transport = httpx.MockTransport(handle)
    with Client("http://imgsvc.test", "isk_k", transport=transport, sleep=lambda s: None) as c:
        with pytest.raises(ServiceUnavailable):
            c.create_sub_key("a")  # would make a second key if repeated
        assert len(sent) == 1
        with pytest.raises(ServiceUnavailable) as caught:
            c.upscale(small_png())  # idempotent: retried, with one key for every attempt
    posts = sent[1:]
    assert len(posts) == 5 and caught.value.request_id == "req_x"
    assert len({p.headers["idempotency-key"] for p in posts}) == 1


def test_connection_errors_are_retried_and_never_show_the_key() -> None:
    key = "isk_SECRETsecret0123456789abcdefgh_zz"
    attempts: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        attempts.append(request.headers.get("idempotency-key", ""))
        raise httpx.ReadError(f"reset while sending Bearer {key}")

    transport = httpx.MockTransport(handle)
    with Client("http://imgsvc.test", key, transport=transport, max_attempts=3,
                sleep=lambda s: None) as c:  # fmt: skip
        with pytest.raises(ApiConnectionError) as caught:
            c.remove_background(small_png())
        assert key not in repr(c) and key not in str(c)
    exc = caught.value
    assert len(attempts) == 3 and len(set(attempts)) == 1
    assert exc.status == 0 and exc.code == "connection_error" and exc.__cause__ is None
    assert key not in f"{exc} {exc!r} {exc.args} {exc.message}"
