"""Every call of the API as a `Call`: the request (pure data) and the reader of its answer.

Both clients turn their methods' arguments into one of these and hand it to their transport,
so what is sent, and how an answer is read, exists once. Operations and job submissions carry
one Idempotency-Key per logical call (the caller's, or a fresh one), the same on every retry:
a retry after a lost answer is replayed by the service, never run or charged twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, TypedDict, TypeVar, Unpack

import httpx

from imgsvc.client.errors import InvalidResponse
from imgsvc.client.options import (
    EraseOptions,
    InpaintOptions,
    Operation,
    OptionValue,
    RemoveBackgroundOptions,
    UpscaleOptions,
    checked_names,
    form_fields,
    form_value,
)
from imgsvc.client.results import (
    Account,
    CreatedKey,
    ImageResult,
    Job,
    JobQuote,
    ModelInfo,
    Quote,
    UsagePage,
    UsageSummary,
    read_account,
    read_accounts,
    read_created_key,
    read_image,
    read_job,
    read_job_list,
    read_job_quote,
    read_models,
    read_quote,
    read_secret,
    read_usage_page,
    read_usage_summary,
)
from imgsvc.client.retry import parse_retry_after
from imgsvc.client.sending import Call, RequestSpec, new_idempotency_key
from imgsvc.client.sources import (
    FilePart,
    ImageSource,
    JobFile,
    file_part,
    job_part,
    upload,
    upload_or_url,
)

T = TypeVar("T")
GroupBy = Literal["day", "operation", "client_ref", "key"]
# Form fields of a job that are not an operation's options.
JOB_FIELDS = frozenset({"operation", "options", "files", "file", "urls", "webhook_url"})


class QuoteOptions(TypedDict, total=False):
    """What `/v1/quote` prices besides the operation and the input size."""

    size: Literal["preview", "full"] | None  # remove-background
    scale: float | None  # upscale (default 4)
    target_width: int | None  # upscale
    target_height: int | None  # upscale
    prompt: bool | None  # inpaint: with a prompt (else erase)
    steps: int | None  # inpaint


class JobQuoteInputs(TypedDict, total=False):
    """A job's images besides `files` (exactly one of the three), its options and the file
    every item shares. None means not given."""

    zip_file: bytes | str | os.PathLike[str] | None
    urls: Sequence[str] | None
    options: Mapping[str, OptionValue] | None
    bg_image: ImageSource | None  # remove-background: the background of every item
    mask: ImageSource | None  # inpaint: the mask of every item


class JobSubmission(JobQuoteInputs, total=False):
    webhook_url: str | None
    idempotency_key: str | None  # default: a new one, the same for every retry
    client_ref: str | None  # X-Client-Ref: stored on the job's usage rows


class UsageFilters(TypedDict, total=False):
    """Which usage rows: `since` inclusive, `until` exclusive (UTC; a naive datetime is UTC)."""

    since: datetime | str | None
    until: datetime | str | None
    operation: Operation | None
    client_ref: str | None
    key_id: int | None


# -- readers of answers ------------------------------------------------------------------------


def json_reader(read: Callable[[object], T]) -> Callable[[httpx.Response], T]:
    """A reader of a JSON answer."""

    def reader(response: httpx.Response) -> T:
        try:
            body = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise InvalidResponse(
                response.status_code,
                "invalid_response",
                f"expected JSON, got {kind}",
                response.headers.get("x-request-id"),
            ) from None
        return read(body)

    return reader


def read_image_answer(response: httpx.Response) -> ImageResult:
    return read_image(response.status_code, response.headers, response.content)


def read_text(response: httpx.Response) -> str:
    return response.text


def read_bytes(response: httpx.Response) -> bytes:
    return response.content


def read_job_poll(response: httpx.Response) -> tuple[Job, float | None]:
    """A job, and the Retry-After its answer carried (when to poll again), if any."""
    job = json_reader(read_job)(response)
    return job, parse_retry_after(response.headers.get("retry-after"))


# -- operations --------------------------------------------------------------------------------


def _metered(
    path: str,
    data: dict[str, str],
    files: list[tuple[str, FilePart]],
    idempotency_key: str | None,
    client_ref: str | None,
) -> RequestSpec:
    headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
    if client_ref is not None:
        headers["X-Client-Ref"] = client_ref
    return RequestSpec("POST", path, headers=headers, data=data, files=files)


def remove_background(
    image: ImageSource,
    *,
    bg_image: ImageSource | None = None,
    idempotency_key: str | None = None,
    client_ref: str | None = None,
    **options: Unpack[RemoveBackgroundOptions],
) -> Call[ImageResult]:
    data = dict(form_fields(options))
    files: list[tuple[str, FilePart]] = []
    for field, source in (("image", image), ("bg_image", bg_image)):
        if source is None:
            continue
        part, url = upload_or_url(source)
        if part is not None:
            files.append((field, part))
        elif url is not None:
            data[f"{field}_url"] = url
    spec = _metered("/v1/remove-background", data, files, idempotency_key, client_ref)
    return Call(spec, read_image_answer)


def upscale(
    image: ImageSource,
    *,
    idempotency_key: str | None = None,
    client_ref: str | None = None,
    **options: Unpack[UpscaleOptions],
) -> Call[ImageResult]:
    files = [("image", upload(image, "upscale"))]
    spec = _metered("/v1/upscale", dict(form_fields(options)), files, idempotency_key, client_ref)
    return Call(spec, read_image_answer)


def inpaint(
    image: ImageSource,
    mask: ImageSource | None = None,
    *,
    prompt: str | None = None,
    idempotency_key: str | None = None,
    client_ref: str | None = None,
    **options: Unpack[InpaintOptions],
) -> Call[ImageResult]:
    """Repaint the mask's white area from `prompt`; without a prompt, erase it. Without
    `mask` (and `mask_boxes`), the image's transparent pixels are the area."""
    data = dict(form_fields(options))
    if prompt is not None:
        data["prompt"] = prompt
    files = [("image", upload(image, "inpaint"))]
    if mask is not None:
        files.append(("mask", upload(mask, "inpaint's mask")))
    return Call(
        _metered("/v1/inpaint", data, files, idempotency_key, client_ref), read_image_answer
    )


def erase(
    image: ImageSource,
    mask: ImageSource | None = None,
    *,
    idempotency_key: str | None = None,
    client_ref: str | None = None,
    **options: Unpack[EraseOptions],
) -> Call[ImageResult]:
    """Remove what the mask covers (no prompt): flat-priced, needs no diffusion model."""
    return inpaint(image, mask, idempotency_key=idempotency_key, client_ref=client_ref, **options)


def quote(
    operation: Operation, width: int, height: int, **sizes: Unpack[QuoteOptions]
) -> Call[Quote]:
    """POST /v1/quote: the price of a call from the image's size alone; nothing is charged."""
    body: dict[str, object] = {"operation": operation, "width": width, "height": height}
    body |= {k: v for k, v in sizes.items() if v is not None}
    return Call(RequestSpec("POST", "/v1/quote", json=body), json_reader(read_quote))


# -- jobs --------------------------------------------------------------------------------------


def _job_submission(
    operation: Operation,
    files: Sequence[JobFile],
    inputs: JobQuoteInputs,
    *,
    webhook_url: str | None,
    headers: dict[str, str],
    dry_run: bool,
) -> RequestSpec:
    zip_file, urls = inputs.get("zip_file"), inputs.get("urls") or ()
    bg_image, mask = inputs.get("bg_image"), inputs.get("mask")
    if sum(1 for given in (files, zip_file is not None, urls) if given) != 1:
        raise ValueError("a job takes its images as exactly one of files, zip_file or urls")
    options = dict(inputs.get("options") or {})
    checked_names(options, JOB_FIELDS)
    params = [("dry_run", "true")] if dry_run else []
    if urls:
        if bg_image is not None or mask is not None:
            raise ValueError("a job by urls takes no bg_image or mask file; send files instead")
        body: dict[str, object] = {"operation": operation, "options": options, "urls": list(urls)}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        return RequestSpec("POST", "/v1/jobs", params=params, headers=headers, json=body)
    data = {"operation": operation, **{k: form_value(v) for k, v in options.items()}}
    if webhook_url is not None:
        data["webhook_url"] = webhook_url
    if zip_file is not None:
        name = "images.zip" if isinstance(zip_file, bytes) else None
        parts = [("file", file_part(zip_file, name))]
    else:
        parts = [("files", job_part(item)) for item in files]
    for field, shared in (("bg_image", bg_image), ("mask", mask)):
        if shared is not None:
            parts.append((field, upload(shared, f"a job's {field}")))
    return RequestSpec("POST", "/v1/jobs", params=params, headers=headers, data=data, files=parts)


def submit_job(
    operation: Operation, files: Sequence[JobFile] = (), **submission: Unpack[JobSubmission]
) -> Call[Job]:
    """POST /v1/jobs: the images as `files`, one `zip_file` or `urls`; 202 with the job."""
    headers = {"Idempotency-Key": submission.get("idempotency_key") or new_idempotency_key()}
    client_ref = submission.get("client_ref")
    if client_ref is not None:
        headers["X-Client-Ref"] = client_ref
    spec = _job_submission(
        operation,
        files,
        submission,
        webhook_url=submission.get("webhook_url"),
        headers=headers,
        dry_run=False,
    )
    return Call(spec, json_reader(read_job))


def quote_job(
    operation: Operation, files: Sequence[JobFile] = (), **inputs: Unpack[JobQuoteInputs]
) -> Call[JobQuote]:
    """`POST /v1/jobs?dry_run=true`: every image decoded and priced, nothing created."""
    spec = _job_submission(operation, files, inputs, webhook_url=None, headers={}, dry_run=True)
    return Call(spec, json_reader(read_job_quote))


def job_path(job_id: str) -> str:
    """`/v1/jobs/{id}`, the id checked to be one path segment."""
    if not job_id or "/" in job_id or "?" in job_id or "#" in job_id or job_id in (".", ".."):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"/v1/jobs/{job_id}"


def get_job(job_id: str) -> Call[Job]:
    return Call(RequestSpec("GET", job_path(job_id)), json_reader(read_job))


def poll_job(job_id: str) -> Call[tuple[Job, float | None]]:
    return Call(RequestSpec("GET", job_path(job_id)), read_job_poll)


def list_jobs(limit: int = 20, offset: int = 0) -> Call[list[Job]]:
    params = [("limit", str(limit)), ("offset", str(offset))]
    return Call(RequestSpec("GET", "/v1/jobs", params=params), json_reader(read_job_list))


def cancel_job(job_id: str) -> Call[Job]:
    return Call(RequestSpec("DELETE", job_path(job_id)), json_reader(read_job))


def job_result(job_id: str) -> RequestSpec:
    """The finished job's zip (streamed to a file by the clients)."""
    return RequestSpec("GET", job_path(job_id) + "/result")


def job_item(job_id: str, item: int) -> Call[bytes]:
    return Call(RequestSpec("GET", f"{job_path(job_id)}/items/{int(item)}"), read_bytes)


def webhook_secret() -> Call[str]:
    """A new signing secret for the key's job webhooks (replaces the old one)."""
    spec = RequestSpec("POST", "/v1/webhooks/secret", replayable=False)
    return Call(spec, json_reader(read_secret))


# -- account -----------------------------------------------------------------------------------


def _time_param(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat()


def _usage_params(filters: UsageFilters) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, datetime):
            params.append((name, _time_param(value)))
        else:
            params.append((name, str(value)))
    return params


def account() -> Call[Account]:
    return Call(RequestSpec("GET", "/v1/account"), json_reader(read_account))


def usage(limit: int = 100, offset: int = 0, **filters: Unpack[UsageFilters]) -> Call[UsagePage]:
    params = [*_usage_params(filters), ("limit", str(limit)), ("offset", str(offset))]
    return Call(RequestSpec("GET", "/v1/usage", params=params), json_reader(read_usage_page))


def usage_csv(limit: int = 100_000, offset: int = 0, **filters: Unpack[UsageFilters]) -> Call[str]:
    params = [*_usage_params(filters), ("limit", str(limit)), ("offset", str(offset))]
    params.append(("format", "csv"))
    return Call(RequestSpec("GET", "/v1/usage", params=params), read_text)


def usage_summary(group_by: GroupBy = "day", **filters: Unpack[UsageFilters]) -> Call[UsageSummary]:
    params = [*_usage_params(filters), ("group_by", group_by)]
    spec = RequestSpec("GET", "/v1/usage/summary", params=params)
    return Call(spec, json_reader(read_usage_summary))


def _month(month: str) -> str:
    if len(month) != 7 or month[4] != "-" or not (month[:4] + month[5:]).isdigit():
        raise ValueError(f"a month is YYYY-MM: {month!r}")
    return f"/v1/statements/{month}"


def statement(month: str) -> Call[UsageSummary]:
    """The calendar month (UTC), summed by operation."""
    return Call(RequestSpec("GET", _month(month)), json_reader(read_usage_summary))


def statement_csv(month: str) -> Call[str]:
    """Every charged call of the month, as CSV."""
    return Call(RequestSpec("GET", _month(month), params=[("format", "csv")]), read_text)


def create_sub_key(
    name: str, *, monthly_cap: int | None = None, scopes: Sequence[str] | None = None
) -> Call[CreatedKey]:
    body: dict[str, object] = {"name": name}
    if monthly_cap is not None:
        body["monthly_cap"] = monthly_cap
    if scopes is not None:
        body["scopes"] = list(scopes)
    # Not replayable: a retry after a lost answer would make a second key.
    spec = RequestSpec("POST", "/v1/keys", json=body, replayable=False)
    return Call(spec, json_reader(read_created_key))


def sub_keys() -> Call[list[Account]]:
    return Call(RequestSpec("GET", "/v1/keys"), json_reader(read_accounts))


def revoke_sub_key(key_id: int) -> Call[Account]:
    return Call(RequestSpec("DELETE", f"/v1/keys/{int(key_id)}"), json_reader(read_account))


def sub_key_usage(key_id: int, limit: int = 100, offset: int = 0) -> Call[UsagePage]:
    params = [("limit", str(limit)), ("offset", str(offset))]
    spec = RequestSpec("GET", f"/v1/keys/{int(key_id)}/usage", params=params)
    return Call(spec, json_reader(read_usage_page))


def models() -> Call[list[ModelInfo]]:
    return Call(RequestSpec("GET", "/v1/models"), json_reader(read_models))
