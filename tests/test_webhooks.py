"""Webhook deliveries (Standard Webhooks signatures, retries, the SSRF rules of a POST) against a
real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

import imgsvc.fetch as fetch_module
from imgsvc.fetch import (
    FetchPolicy,
    UrlFetchFailed,
    UrlNotAllowed,
    check_url,
    fetch,
    parse_networks,
    post,
)
from imgsvc.jobs.webhooks import (
    DEFAULT_SCHEDULE_S,
    Attempt,
    attempt_delivery,
    new_secret,
    retry_delay,
    signed_headers,
)

LOCAL = parse_networks("127.0.0.1/32")
POLICY = FetchPolicy(max_bytes=1_000_000, timeout_s=3, allow=LOCAL)
BODY = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()


@dataclass(frozen=True)
class Answer:
    """What the receiver answers to one request."""

    status: int = 200
    delay_s: float = 0.0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drip: bool = False  # send the header one byte at a time, for seconds


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    answers: list[Answer] = field(default_factory=list)  # one per request, then 200
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Receiver(BaseHTTPRequestHandler):
    script: Script  # set on a subclass per server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with self.script.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.script.received.append(Received(self.path, headers, body))
            answer = self.script.answers.pop(0) if self.script.answers else Answer()
        time.sleep(answer.delay_s)
        if answer.drip:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        return  # the client hung up on a slow answer, as the tests intend


@dataclass
class Receiver:
    url: str
    script: Script

    def answer(self, *answers: Answer) -> None:
        self.script.answers.extend(answers)

    @property
    def received(self) -> list[Received]:
        return self.script.received


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    script = Script()
    handler = type("Handler", (_Receiver,), {"script": script})
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook", script)
    server.shutdown()
    server.server_close()


def _verify(secret: str, got: Received) -> object:
    return Webhook(secret).verify(got.body, got.headers)


def test_new_secret_is_24_random_bytes_standardwebhooks_accepts() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert new_secret() != secret
    Webhook(secret)


def test_signed_headers_follow_the_spec() -> None:
    secret = new_secret()
    when = datetime(2025, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    headers = signed_headers(secret, "msg_1", when, BODY)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(int(when.timestamp()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"msg_1.{int(when.timestamp())}.".encode() + BODY
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "imgsvc-webhooks"
    # the same instant in another zone, or naive UTC, signs the same
    elsewhere = when.astimezone(timezone(timedelta(hours=-5)))
    assert signed_headers(secret, "msg_1", elsewhere, BODY) == headers
    assert signed_headers(secret, "msg_1", when.replace(tzinfo=None), BODY) == headers


@pytest.mark.parametrize(
    ("secret", "msg_id", "body"),
    [
        ("whsec_", "msg_1", BODY),
        ("whsec_a", "msg_1", BODY),
        (None, "a b", BODY),
        (None, "m", b"\xff"),
    ],
    ids=["empty-secret", "bad-base64", "space-in-id", "body-not-utf8"],
)
def test_unsignable_message_is_not_sent(
    receiver: Receiver, secret: str | None, msg_id: str, body: bytes
) -> None:
    with pytest.raises(ValueError):
        signed_headers(secret or new_secret(), msg_id, datetime.now(UTC), body)
    result = attempt_delivery(receiver.url, secret or new_secret(), msg_id, body, POLICY)
    assert (result.status_code, result.retry, result.delivered) == (None, False, False)
    assert result.error
    assert receiver.received == []


def test_delivery_verifies_with_standardwebhooks(receiver: Receiver) -> None:
    secret = new_secret()
    result = attempt_delivery(receiver.url, secret, "msg_ok", BODY, POLICY)
    assert result == Attempt(status_code=200, error=None, retry=False, delivered=True)
    [got] = receiver.received
    assert got.path == "/hook"
    assert got.body == BODY
    assert got.headers["host"] == receiver.url.split("/")[2]
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == "imgsvc-webhooks"
    assert _verify(secret, got) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        _verify(new_secret(), got)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", got.headers)


def test_retries_until_delivered_with_fresh_signatures(receiver: Receiver) -> None:
    receiver.answer(Answer(500), Answer(500))
    secret = new_secret()
    schedule = (0.05, 0.05, 0.05)
    attempts = 0
    while True:
        result = attempt_delivery(receiver.url, secret, "msg_retry", BODY, POLICY)
        attempts += 1
        if not result.retry:
            break
        assert result.status_code == 500
        assert result.error == "HTTP 500"
        delay = retry_delay(attempts, schedule)
        assert delay is not None
        time.sleep(delay)
    assert result.delivered
    assert attempts == 3
    assert len(receiver.received) == 3
    assert {got.headers["webhook-id"] for got in receiver.received} == {"msg_retry"}
    for got in receiver.received:
        _verify(secret, got)


def test_each_attempt_is_timestamped_and_signed_afresh(receiver: Receiver) -> None:
    secret = new_secret()
    start = datetime.now(UTC)
    for offset in (0, 61):
        attempt_delivery(
            receiver.url, secret, "msg_t", BODY, POLICY, now=start + timedelta(seconds=offset)
        )
    first, second = receiver.received
    assert int(second.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"]) == 61
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_t"
    _verify(secret, first)
    _verify(secret, second)


def test_gone_stops_delivery(receiver: Receiver) -> None:
    receiver.answer(Answer(410))
    result = attempt_delivery(receiver.url, new_secret(), "msg_gone", BODY, POLICY)
    assert (result.status_code, result.retry, result.delivered) == (410, False, False)
    assert result.error is not None and "410" in result.error
    assert len(receiver.received) == 1


RETRIED = (408, 429, 500, 502, 503)


@pytest.mark.parametrize("status", [400, 401, 404, 422, *RETRIED])
def test_which_answers_are_retried(receiver: Receiver, status: int) -> None:
    receiver.answer(Answer(status))
    result = attempt_delivery(receiver.url, new_secret(), "msg_s", BODY, POLICY)
    assert result == Attempt(status, f"HTTP {status}", retry=status in RETRIED, delivered=False)


@pytest.mark.parametrize("status", [201, 202, 204])
def test_any_2xx_is_delivered(receiver: Receiver, status: int) -> None:
    receiver.answer(Answer(status))
    result = attempt_delivery(receiver.url, new_secret(), "msg_2", BODY, POLICY)
    assert result == Attempt(status, None, retry=False, delivered=True)


def test_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.answer(Answer(307, headers=(("Location", "/elsewhere"),)))
    result = attempt_delivery(receiver.url, new_secret(), "msg_r", BODY, POLICY)
    assert (result.status_code, result.retry, result.delivered) == (307, False, False)
    assert result.error is not None and "not followed" in result.error
    assert [got.path for got in receiver.received] == ["/hook"]


def test_slow_receiver_times_out_and_is_retried(receiver: Receiver) -> None:
    receiver.answer(Answer(200, delay_s=2))
    policy = FetchPolicy(max_bytes=1000, timeout_s=0.5, allow=LOCAL)
    started = time.monotonic()
    result = attempt_delivery(receiver.url, new_secret(), "msg_slow", BODY, policy)
    assert time.monotonic() - started < 1.5
    assert (result.status_code, result.retry, result.delivered) == (None, True, False)
    assert result.error is not None and "timed out" in result.error


def test_a_dripping_answer_cannot_outlast_the_deadline(receiver: Receiver) -> None:
    receiver.answer(Answer(drip=True))  # each byte well inside the read timeout
    policy = FetchPolicy(max_bytes=1000, timeout_s=0.5, allow=LOCAL)
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match=r"webhook_url timed out"):
        post(receiver.url, BODY, {}, policy)
    assert time.monotonic() - started < 1.5


def test_large_answer_body_is_not_read_in_full(receiver: Receiver) -> None:
    receiver.answer(Answer(200, body=b"x" * 5_000_000))
    assert post(receiver.url, BODY, {"content-type": "application/json"}, POLICY) == 200
    assert receiver.received[0].headers["user-agent"] == "imgsvc"


def test_refused_connection_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = attempt_delivery(f"http://127.0.0.1:{port}/", new_secret(), "m", BODY, POLICY)
    assert (result.status_code, result.retry, result.delivered) == (None, True, False)
    assert result.error is not None and "webhook_url" in result.error


def test_loopback_refused_without_allow_list(receiver: Receiver) -> None:
    policy = FetchPolicy(max_bytes=1000, timeout_s=2)
    with pytest.raises(UrlNotAllowed, match=r"webhook_url resolves to 127.0.0.1"):
        check_url(receiver.url, policy)
    with pytest.raises(UrlNotAllowed):
        post(receiver.url, BODY, {}, policy)
    result = attempt_delivery(receiver.url, new_secret(), "msg_l", BODY, policy)
    assert (result.status_code, result.retry, result.delivered) == (None, False, False)
    assert result.error is not None and result.error.startswith("not allowed:")
    assert receiver.received == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "file:///etc/passwd",
        "http://[::ffff:127.0.0.1]/",  # loopback as v6-mapped is not inside 127.0.0.1/32
        "http://10.0.0.5/hook",
        "http://[::1]/",
        "http://167772165/",  # 10.0.0.5 as one decimal number
        "ftp://example.com/",
        "http://user:pw@8.8.8.8/",
        "http://8.8.8.8:99999/",
        "http://[::1/",
        "http:///path",
    ],
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(UrlNotAllowed, match=r"^webhook_url "):
        check_url(url, POLICY)


def test_check_url_passes_allowed_and_fails_unresolvable() -> None:
    check_url("http://127.0.0.1:8080/hook", POLICY)
    check_url("https://8.8.8.8/hook", FetchPolicy(max_bytes=1, timeout_s=1))
    with pytest.raises(UrlFetchFailed, match=r"could not be resolved"):
        check_url("https://nowhere.invalid/hook", POLICY)
    with pytest.raises(UrlNotAllowed, match=r"^callback "):
        check_url("file:///x", POLICY, what="callback")


def test_fetch_messages_still_name_image_url() -> None:
    with pytest.raises(UrlNotAllowed, match=r"^image_url must be an http"):
        fetch("file:///etc/passwd", POLICY)
    with pytest.raises(UrlNotAllowed, match=r"^image_url resolves to 169.254.169.254"):
        fetch("http://169.254.169.254/", FetchPolicy(max_bytes=1, timeout_s=1))
    with pytest.raises(UrlNotAllowed, match=r"^bg_image_url resolves to"):
        fetch("http://10.0.0.1/", POLICY, what="bg_image_url")


def test_retry_delay_jitter_and_end() -> None:
    rng = random.Random(7)
    schedule = (1.0, 10.0, 100.0)
    for attempt, base in enumerate(schedule, start=1):
        delays = [retry_delay(attempt, schedule, rng) for _ in range(2000)]
        values = [d for d in delays if d is not None]
        assert len(values) == len(delays)
        assert all(0.8 * base <= d <= 1.2 * base for d in values)
        assert min(values) < 0.85 * base and max(values) > 1.15 * base
    assert retry_delay(4, schedule, rng) is None
    assert retry_delay(1, (), rng) is None
    with pytest.raises(ValueError):
        retry_delay(0, schedule)


def test_default_schedule() -> None:
    assert DEFAULT_SCHEDULE_S == (5, 300, 1800, 7200, 18000, 36000)
    first = retry_delay(1, DEFAULT_SCHEDULE_S)
    assert first is not None and 4 <= first <= 6
    assert retry_delay(len(DEFAULT_SCHEDULE_S) + 1, DEFAULT_SCHEDULE_S) is None


def test_nothing_is_sent_to_a_peer_other_than_the_checked_address(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_target = fetch_module._target

    def elsewhere(url: str, allow: object, what: str = "image_url") -> fetch_module._Target:
        checked = real_target(url, LOCAL, what)  # connects to 127.0.0.1 …
        return dataclasses.replace(checked, ip=ipaddress.ip_address("127.0.0.2"))  # … checked .2

    monkeypatch.setattr(fetch_module, "_target", elsewhere)
    with pytest.raises(UrlNotAllowed, match=r"connected to 127\.0\.0\.1, not the checked"):
        post(receiver.url, BODY, {}, POLICY)
    result = attempt_delivery(receiver.url, new_secret(), "msg_p", BODY, POLICY)
    assert (result.status_code, result.retry) == (None, False)
    time.sleep(0.1)
    assert receiver.received == []
