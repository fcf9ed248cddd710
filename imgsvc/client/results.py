"""What the calls return, as typed objects, and how each is read from an answer.

Readers are plain functions of a decoded body (and headers): the synchronous and the
asynchronous client share them. A body without a field the type needs raises
`InvalidResponse`; fields this client does not know are kept in `raw` where it has one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgsvc.client.errors import InvalidResponse

FINISHED_STATUSES = frozenset({"succeeded", "partially_failed", "failed", "canceled"})


@dataclass(frozen=True)
class ImageResult:
    """The result of an operation: the image (or zip) and what the call cost."""

    content: bytes = field(repr=False)
    content_type: str
    credits_charged: int
    credits_remaining: int | None
    request_id: str | None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    warning: str | None = None
    replayed: bool = False  # the stored answer of an earlier call with the same Idempotency-Key
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the content to `path` (its folder is made); the path."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.content)
        return dest


@dataclass(frozen=True)
class Quote:
    operation: str
    credits: int
    output_width: int
    output_height: int
    price_version: str
    exact: bool = True  # False where the model's working size is estimated (prompt inpainting)


@dataclass(frozen=True)
class ItemFailure:
    """An image of a job that cannot be processed, and why."""

    item: int
    name: str
    code: str
    message: str


@dataclass(frozen=True)
class JobQuote:
    """A job's price before it is submitted (`?dry_run=true`): nothing created, nothing held."""

    operation: str
    items: int
    credits: int
    price_version: str | None
    failed: list[ItemFailure]


@dataclass(frozen=True)
class ItemError:
    code: str
    message: str


@dataclass(frozen=True)
class JobItem:
    item: int
    name: str
    status: str
    credits: int
    error: ItemError | None = None
    output_name: str | None = None
    output_width: int | None = None
    output_height: int | None = None
    model: str | None = None
    attempts: int = 0
    url: str | None = None


@dataclass(frozen=True)
class JobProgress:
    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.canceled


@dataclass(frozen=True)
class Job:
    """A batch job as `GET /v1/jobs/{id}` answers it (a job list has no `items`)."""

    id: str
    operation: str
    status: str
    progress: JobProgress
    credits_quoted: int
    credits_charged: int
    items: list[JobItem] = field(default_factory=list)
    queue_position: int | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    result_url: str | None = None
    # Shown once, with the key's first job that has a webhook_url.
    webhook_secret: str | None = field(default=None, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class Account:
    """A key and its account: `credits` is the account's balance."""

    id: int
    name: str
    key_prefix: str
    credits: int
    scopes: list[str]
    rate_limit: str | None
    monthly_cap: int | None
    month_spent: int
    expires_at: datetime | None
    created_at: datetime | None


@dataclass(frozen=True)
class CreatedKey:
    """A new sub-key: `key` is its secret, shown only this once."""

    key: str = field(repr=False)
    info: Account


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: int
    operation: str
    model: str
    client_ref: str | None
    input_width: int
    input_height: int
    output_width: int
    output_height: int
    credits: int
    price_version: str
    duration_ms: int
    created_at: datetime | None


@dataclass(frozen=True)
class UsagePage:
    data: list[UsageRecord]
    limit: int
    offset: int
    next_offset: int | None  # None on the last page


@dataclass(frozen=True)
class UsageGroup:
    group: str
    calls: int
    credits: int


@dataclass(frozen=True)
class UsageSummary:
    group_by: str
    data: list[UsageGroup]
    total_calls: int
    total_credits: int


@dataclass(frozen=True)
class ModelInfo:
    operation: str
    name: str
    present: bool
    default: bool
    note: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


# -- readers -----------------------------------------------------------------------------------


class _Fields:
    """A JSON object's fields, each read as a type or refused as an invalid answer."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise InvalidResponse(200, "invalid_response", f"{what} is not a JSON object")
        self.raw: dict[str, Any] = value
        self.what = what

    def _bad(self, name: str, kind: str) -> InvalidResponse:
        return InvalidResponse(200, "invalid_response", f"{self.what}: {name!r} is not {kind}")

    def num(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, "an integer")
        return value

    def opt_num(self, name: str) -> int | None:
        return None if self.raw.get(name) is None else self.num(name)

    def text(self, name: str, default: str | None = None) -> str:
        value = self.raw.get(name, default)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def opt_text(self, name: str) -> str | None:
        return None if self.raw.get(name) is None else self.text(name)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def time(self, name: str) -> datetime | None:
        value = self.opt_text(name)
        if value is None:
            return None
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise self._bad(name, "an ISO 8601 time") from None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def array(self, name: str) -> list[Any]:
        value = self.raw.get(name, [])
        if not isinstance(value, list):
            raise self._bad(name, "a list")
        return value

    def obj(self, name: str) -> _Fields:
        return _Fields(self.raw.get(name) or {}, f"{self.what}.{name}")


def header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def read_image(status: int, headers: Mapping[str, str], content: bytes) -> ImageResult:
    return ImageResult(
        content=content,
        content_type=headers.get("content-type", "application/octet-stream"),
        credits_charged=header_int(headers, "x-credits-charged") or 0,
        credits_remaining=header_int(headers, "x-credits-remaining"),
        request_id=headers.get("x-request-id"),
        model=headers.get("x-model"),
        width=header_int(headers, "x-width"),
        height=header_int(headers, "x-height"),
        seed=header_int(headers, "x-seed"),
        warning=headers.get("x-warning") or None,
        replayed=headers.get("idempotent-replayed") == "true",
        headers=dict(headers),
    )


def read_quote(body: object) -> Quote:
    f = _Fields(body, "the quote")
    return Quote(
        operation=f.text("operation"),
        credits=f.num("credits"),
        output_width=f.num("output_width"),
        output_height=f.num("output_height"),
        price_version=f.text("price_version"),
        exact=f.flag("exact", True),
    )


def read_failures(values: list[Any]) -> list[ItemFailure]:
    failures = []
    for value in values:
        f = _Fields(value, "a failed item")
        error = f.obj("error")
        failures.append(
            ItemFailure(
                item=f.num("item", 0),
                name=f.text("name", ""),
                code=error.text("code", "failed"),
                message=error.text("message", ""),
            )
        )
    return failures


def read_job_quote(body: object) -> JobQuote:
    f = _Fields(body, "the job quote")
    return JobQuote(
        operation=f.text("operation"),
        items=f.num("items", 0),
        credits=f.num("credits"),
        price_version=f.opt_text("price_version"),
        failed=read_failures(f.array("failed")),
    )


def _read_item(value: object) -> JobItem:
    f = _Fields(value, "a job item")
    error = None
    if f.raw.get("error") is not None:
        e = f.obj("error")
        error = ItemError(e.text("code", "failed"), e.text("message", ""))
    return JobItem(
        item=f.num("item"),
        name=f.text("name"),
        status=f.text("status"),
        credits=f.num("credits", 0),
        error=error,
        output_name=f.opt_text("output_name"),
        output_width=f.opt_num("output_width"),
        output_height=f.opt_num("output_height"),
        model=f.opt_text("model"),
        attempts=f.num("attempts", 0),
        url=f.opt_text("url"),
    )


def read_job(body: object) -> Job:
    f = _Fields(body, "the job")
    p = f.obj("progress")
    credits = f.obj("credits")
    return Job(
        id=f.text("id"),
        operation=f.text("operation"),
        status=f.text("status"),
        progress=JobProgress(
            total=p.num("total", 0),
            queued=p.num("queued", 0),
            running=p.num("running", 0),
            succeeded=p.num("succeeded", 0),
            failed=p.num("failed", 0),
            canceled=p.num("canceled", 0),
        ),
        credits_quoted=credits.num("quoted", 0),
        credits_charged=credits.num("charged", 0),
        items=[_read_item(i) for i in f.array("items")],
        queue_position=f.opt_num("queue_position"),
        created_at=f.time("created_at"),
        finished_at=f.time("finished_at"),
        expires_at=f.time("expires_at"),
        result_url=f.opt_text("result_url"),
        webhook_secret=f.opt_text("webhook_secret"),
        raw=f.raw,
    )


def read_job_list(body: object) -> list[Job]:
    return [read_job(j) for j in _Fields(body, "the job list").array("jobs")]


def read_account(body: object) -> Account:
    f = _Fields(body, "the account")
    return Account(
        id=f.num("id"),
        name=f.text("name"),
        key_prefix=f.text("key_prefix"),
        credits=f.num("credits"),
        scopes=[str(s) for s in f.array("scopes")],
        rate_limit=f.opt_text("rate_limit"),
        monthly_cap=f.opt_num("monthly_cap"),
        month_spent=f.num("month_spent", 0),
        expires_at=f.time("expires_at"),
        created_at=f.time("created_at"),
    )


def read_accounts(body: object) -> list[Account]:
    if not isinstance(body, list):
        raise InvalidResponse(200, "invalid_response", "the key list is not a JSON array")
    return [read_account(a) for a in body]


def read_created_key(body: object) -> CreatedKey:
    f = _Fields(body, "the new key")
    return CreatedKey(key=f.text("key"), info=read_account(f.raw.get("info")))


def _read_usage(value: object) -> UsageRecord:
    f = _Fields(value, "a usage row")
    return UsageRecord(
        request_id=f.text("request_id"),
        key_id=f.num("key_id"),
        operation=f.text("operation"),
        model=f.text("model", ""),
        client_ref=f.opt_text("client_ref"),
        input_width=f.num("input_width", 0),
        input_height=f.num("input_height", 0),
        output_width=f.num("output_width", 0),
        output_height=f.num("output_height", 0),
        credits=f.num("credits"),
        price_version=f.text("price_version", ""),
        duration_ms=f.num("duration_ms", 0),
        created_at=f.time("created_at"),
    )


def read_usage_page(body: object) -> UsagePage:
    f = _Fields(body, "the usage page")
    return UsagePage(
        data=[_read_usage(r) for r in f.array("data")],
        limit=f.num("limit"),
        offset=f.num("offset"),
        next_offset=f.opt_num("next_offset"),
    )


def read_usage_summary(body: object) -> UsageSummary:
    f = _Fields(body, "the usage summary")
    groups = []
    for value in f.array("data"):
        g = _Fields(value, "a usage group")
        groups.append(UsageGroup(g.text("group"), g.num("calls"), g.num("credits")))
    return UsageSummary(
        group_by=f.text("group_by"),
        data=groups,
        total_calls=f.num("total_calls"),
        total_credits=f.num("total_credits"),
    )


def read_models(body: object) -> list[ModelInfo]:
    models = []
    for value in _Fields(body, "the model list").array("data"):
        m = _Fields(value, "a model")
        models.append(
            ModelInfo(
                operation=m.text("operation"),
                name=m.text("name"),
                present=m.flag("present"),
                default=m.flag("default"),
                note=m.opt_text("note"),
                raw=m.raw,
            )
        )
    return models


def read_secret(body: object) -> str:
    return _Fields(body, "the webhook secret").text("secret")
