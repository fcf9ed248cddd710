"""The OpenAPI document as the service answers: every error status an operation can answer with
its real body, the keys as security schemes, binary bodies typed, the headers that matter.

FastAPI documents what a route function returns. The errors are written elsewhere (the edge,
the gate, `app.py`'s handlers), so `install(app)` builds FastAPI's document once and then, for
every operation:

- documents each error status it can answer with the body `{"error": {code, message,
  request_id, ...}}` (`ErrorBody`; remove.bg's `{"errors": [...]}` on its route), FastAPI's
  `HTTPValidationError` 422 replaced. Which statuses: those the route names with
  `responses=errors(...)`, plus those that follow from its dependencies (a key: 401, and 503
  when the database is down; the gate: 403 and 429; the admin token: 401 and 404; a metered
  call: 402, 409, 413, 415, 503, and 507 for its one-item job; a body: 400 where FastAPI
  parses it, 408, 413 and 422) and the server's own 431;
- documents a metered call's other answers: the `?dry_run=true` quote (JSON) and the one-item
  job of `Prefer: respond-async` (202), with the call's headers;
- replaces the `Authorization` / `X-API-Key` header parameters by security schemes;
- gives images, zips and CSV a binary or string schema, and every response `X-Request-Id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal, get_args

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field

from imgsvc.models.registry import Operation
from imgsvc.routes.deps import AdminDep, ApiKeyDep, FreshApiKeyDep
from imgsvc.routes.gate import AdmittedKeyDep
from imgsvc.routes.metered import dry_run_param

# --- error bodies ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """One error: a stable code, what to fix, the request's id, and facts of some errors."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="stable snake_case code, e.g. `invalid_image`")
    message: str = Field(description="what is wrong and what to change")
    request_id: str = Field(description="the request's id (also in `X-Request-Id`)")
    credits_required: int | None = Field(None, description="402: the call's price")
    credits_remaining: int | None = Field(None, description="402: the account's balance")
    monthly_cap: int | None = Field(None, description="402 `monthly_cap_reached`: the cap")
    failed: list[dict[str, Any]] | None = Field(
        None, description="422 on a job none of whose items can run: each item's error"
    )


class ErrorBody(BaseModel):
    """Every error the service answers (but on `/v1.0/removebg`)."""

    error: ErrorDetail


class RemoveBgError(BaseModel):
    title: str = Field(description="what is wrong")
    code: str = Field(description="the same stable code as `error.code` elsewhere")
    request_id: str


class RemoveBgErrors(BaseModel):
    """remove.bg's error body, answered by `/v1.0/removebg`."""

    errors: list[RemoveBgError]


# --- bodies the routes build as plain JSON --------------------------------------------------


class DryRunQuote(BaseModel):
    """`?dry_run=true` on an operation: what the call would cost and produce."""

    operation: str
    credits: int
    output_width: int
    output_height: int
    price_version: str


class RemoveBgResultData(BaseModel):
    result_b64: str = Field(description="the result image, base64")
    foreground_top: int
    foreground_left: int
    foreground_width: int
    foreground_height: int


class RemoveBgResult(BaseModel):
    """`/v1.0/removebg` with `Accept: application/json`: remove.bg's JSON result."""

    data: RemoveBgResultData


class ReadyStatus(BaseModel):
    status: Literal["ready", "starting", "unready"]
    reason: str | None = None
    device: str | None = None
    models: list[dict[str, Any]] | None = None
    missing_weights: list[dict[str, Any]] | None = None


JobStatus = Literal[
    "queued", "running", "succeeded", "partially_failed", "failed", "canceled", "expired"
]
ItemStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobCredits(BaseModel):
    quoted: int = Field(description="held at submission for the items that can run")
    charged: int


class JobSummaryProgress(BaseModel):
    total: int
    done: int
    succeeded: int
    failed: int
    canceled: int


class JobProgress(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class ItemError(BaseModel):
    code: str
    message: str | None


class JobItemPublic(BaseModel):
    item: int
    name: str
    status: ItemStatus
    attempts: int
    credits: int = Field(description="charged once succeeded, held while open, else 0")
    error: ItemError | None
    output_name: str | None
    output_width: int | None
    output_height: int | None
    model: str | None
    url: str = Field(description="the item's output, once it succeeded")


class WebhookDelivery(BaseModel):
    attempt: int
    status_code: int | None
    error: str | None
    at: datetime | None


class WebhookPublic(BaseModel):
    url: str
    status: str | None
    deliveries: list[WebhookDelivery]


class JobSummary(BaseModel):
    id: str
    operation: str
    status: JobStatus
    created_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    progress: JobSummaryProgress
    credits: JobCredits
    result_url: str


class JobList(BaseModel):
    jobs: list[JobSummary]
    limit: int
    offset: int


class JobView(BaseModel):
    """A job with its items (`GET /v1/jobs/{id}`, and the answer of a submission)."""

    id: str
    operation: str
    status: JobStatus
    created_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    progress: JobProgress
    credits: JobCredits
    result_url: str
    queue_position: int | None = Field(description="items of other jobs queued ahead")
    webhook: WebhookPublic | None
    items: list[JobItemPublic]
    webhook_secret: str | None = Field(
        None, description="the key's webhook signing secret, with the first job that has one"
    )


class FailedItem(BaseModel):
    item: int
    name: str
    error: ItemError


class JobQuote(BaseModel):
    """`POST /v1/jobs?dry_run=true`: the job's price; nothing is created."""

    operation: str
    items: int
    credits: int
    price_version: str | None
    failed: list[FailedItem]


# --- statuses -------------------------------------------------------------------------------

DESCRIPTIONS: dict[int, str] = {
    400: "The body could not be parsed (malformed multipart or undecodable JSON).",
    401: "No key, or a malformed, unknown, expired or revoked one (or a wrong admin token).",
    402: "Not enough credits (`insufficient_credits`) or a sub-key's monthly cap "
    "(`monthly_cap_reached`); `X-Credits-Required` names the price.",
    403: "The key's scopes do not allow this.",
    404: "Not found (or the admin API is disabled).",
    408: "The body stopped coming: no byte of it arrived for a while.",
    409: "Not ready yet, or the first request with this `Idempotency-Key` is still running; "
    "`Retry-After` when waiting helps.",
    413: "The body, an upload or an image is over its limit.",
    415: "Not an image, or an unsupported format.",
    422: "A field is missing, of the wrong type or out of range, or an option cannot work "
    "with this input (`invalid_request`, `invalid_input`, `invalid_image`, ...).",
    429: "The key's rate limit; `Retry-After` and the `RateLimit` headers say when to retry.",
    431: "The request line and headers are over the server's limit.",
    503: "The database is unavailable, the operation's weights are not installed, or the device "
    "queue is full; `Retry-After` when a retry will help.",
    507: "The job store is full: the job (or `Prefer: respond-async` call) was not created.",
}
ERROR_STATUSES = frozenset(DESCRIPTIONS)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route decorator: the error statuses it answers beyond those that
    follow from its dependencies, each with the error body."""
    return {s: {"model": ErrorBody, "description": DESCRIPTIONS[s]} for s in statuses}


def job_request_body(json_schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` of `POST /v1/jobs`, which reads its body itself: the multipart form
    (files or one zip, the options as fields or as one JSON `options`) or the JSON of URLs."""
    binary = {"type": "string", "format": "binary"}
    form = {
        "type": "object",
        "required": ["operation"],
        "properties": {
            "operation": {"type": "string", "enum": list(get_args(Operation))},
            "options": {"type": "string", "description": "the options as one JSON object"},
            "files": {"type": "array", "items": binary, "description": "the images"},
            "file": {**binary, "description": "a zip of images (folders kept in the names)"},
            "webhook_url": {"type": "string", "description": "called when the job finishes"},
            "bg_image": {**binary, "description": "remove-background: one shared background"},
            "mask": {**binary, "description": "inpaint: one shared mask"},
        },
        "additionalProperties": {"type": "string", "description": "an option of the operation"},
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": form},
            "application/json": {"schema": json_schema},
        },
    }


def _header(description: str, schema_type: str = "string", required: bool = False) -> Any:
    return {"description": description, "required": required, "schema": {"type": schema_type}}


REQUEST_ID = _header("the request's id: quote it when asking about a call", required=True)
RATE_HEADERS = {
    "RateLimit-Policy": _header('the key\'s limit, e.g. `"default";q=60;w=60`', required=True),
    "RateLimit": _header('where the key stands, e.g. `"default";r=59;t=42`', required=True),
}
RETRY_AFTER = _header("seconds to wait before retrying", "integer")
CALL_HEADERS = {
    "X-Credits-Charged": _header("credits taken for this call", "integer"),
    "X-Credits-Remaining": _header("the account's balance afterwards", "integer"),
    "X-Credits-Would-Charge": _header("`?dry_run=true`: the call's price", "integer"),
    "X-Model": _header("the engine that ran"),
    "X-Width": _header("the result's width", "integer"),
    "X-Height": _header("the result's height", "integer"),
    "Idempotent-Replayed": _header("`true`: the stored answer of an earlier identical request"),
}
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    402: {
        "X-Credits-Required": _header("the call's price", "integer", required=True),
        "X-Credits-Remaining": _header("the account's balance", "integer"),
    },
    409: {"Retry-After": RETRY_AFTER},
    429: {"Retry-After": {**RETRY_AFTER, "required": True}, **RATE_HEADERS},
    503: {"Retry-After": RETRY_AFTER},
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
TEXT = {"schema": {"type": "string"}}
KEY_SCHEMES = {
    "bearerKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "the API key: `Authorization: Bearer isk_…`",
    },
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
ADMIN_SCHEME = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <IMGSVC_ADMIN_TOKEN>`",
    }
}
AUTH_HEADERS = frozenset({"authorization", "x-api-key"})
REMOVEBG_TAG = "remove.bg"  # the remove.bg-compatible routes answer remove.bg's error body


def _dependency(alias: Any) -> Callable[..., Any]:
    dependency: Callable[..., Any] = get_args(alias)[1].dependency
    return dependency


KEY_CALLS = frozenset(_dependency(a) for a in (ApiKeyDep, FreshApiKeyDep, AdmittedKeyDep))
GATE_CALL = _dependency(AdmittedKeyDep)
ADMIN_CALL = AdminDep.dependency


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def _implied(
    calls: set[Callable[..., Any]], operation: dict[str, Any], parses_body: bool
) -> set[int]:
    """The error statuses a route answers because of what it depends on and takes."""
    statuses = {431}
    if calls & KEY_CALLS:
        statuses |= {401, 503}
    if GATE_CALL in calls:
        statuses |= {403, 422, 429}  # scope, X-Client-Ref, rate limit
    if ADMIN_CALL in calls:
        statuses |= {401, 404, 503}
    if dry_run_param in calls:  # a metered call: credits, idempotency, the image, the device
        statuses |= {402, 409, 413, 415, 422, 503}
    if any(p.get("in") in ("path", "query") for p in operation.get("parameters", ())):
        statuses.add(422)
    if "requestBody" in operation:
        statuses |= {408, 413, 422}  # the edge: a body that stalls, or is over the limit
    if parses_body:  # FastAPI reads the body: one it cannot parse is a 400
        statuses.add(400)
    return statuses


# --- the document ---------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and `/openapi.json`) answer the document described above."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            true_to_service(document, app.routes)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def true_to_service(document: dict[str, Any], routes: list[Any]) -> None:
    """Rewrite FastAPI's `document` of `routes` in place (see the module's docstring)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, RemoveBgErrors, RemoveBgResult, DryRunQuote, JobView):
        _add_model(schemas, model)
    uses_key = uses_admin = False
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        calls = set(_calls(route.dependant))
        for method in route.methods or ():
            operation = document["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            if ADMIN_CALL in calls:
                _drop_auth_headers(operation)
                operation["security"] = [{name: []} for name in ADMIN_SCHEME]
                uses_admin = True
            elif calls & KEY_CALLS:
                _drop_auth_headers(operation)
                operation["security"] = [{name: []} for name in KEY_SCHEMES]
                uses_key = True
            compat = REMOVEBG_TAG in operation.get("tags", ())
            implied = _implied(calls, operation, route.body_field is not None)
            if dry_run_param in calls:
                _document_metered(operation, compat)
                if not compat:
                    implied.add(507)  # `Prefer: respond-async` stores a job
            body = "RemoveBgErrors" if compat else "ErrorBody"
            _document_responses(operation, implied, body, GATE_CALL in calls)
    security = document["components"].setdefault("securitySchemes", {})
    if uses_key:
        security.update(KEY_SCHEMES)
    if uses_admin:
        security.update(ADMIN_SCHEME)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _document_metered(operation: dict[str, Any], compat: bool) -> None:
    """A metered call answers its result, or with `?dry_run=true` the quote (JSON); on its own
    routes `Prefer: respond-async` makes it a one-item job (202)."""
    responses = operation["responses"]
    ok = responses.setdefault("200", {"description": "The result."})
    quote = _ref("DryRunQuote")
    schema = {"anyOf": [_ref("RemoveBgResult"), quote]} if compat else quote
    ok.setdefault("content", {})["application/json"] = {"schema": schema}
    ok.setdefault("headers", {}).update(CALL_HEADERS)
    if compat:
        return
    responses["202"] = {
        "description": "`Prefer: respond-async`: the call as a one-item job, its credits held.",
        "content": {"application/json": {"schema": _ref("JobView")}},
        "headers": {
            "Location": _header("the job: `/v1/jobs/{id}`", required=True),
            "Preference-Applied": _header("`respond-async`", required=True),
        },
    }


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _drop_auth_headers(operation: dict[str, Any]) -> None:
    """The key is documented as a security scheme, not as optional header parameters."""
    params = [
        p
        for p in operation.get("parameters", [])
        if not (p.get("in") == "header" and p.get("name", "").lower() in AUTH_HEADERS)
    ]
    if params:
        operation["parameters"] = params
    else:
        operation.pop("parameters", None)


def _document_responses(
    operation: dict[str, Any], implied: set[int], body: str, gated: bool
) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if _is_fastapi_validation(responses.get("422", {})):
        del responses["422"]  # FastAPI's guess: put back, with our body, where it is implied
    declared = {int(s) for s in responses if s.isdigit() and int(s) in ERROR_STATUSES}
    for code in sorted(implied | declared):
        response = responses.setdefault(str(code), {})
        headers = response.setdefault("headers", {})
        headers.update({"X-Request-Id": REQUEST_ID, **ERROR_HEADERS.get(code, {})})
        if response.get("content", {}).get("application/json", {}).get("schema"):
            continue  # a body of its own (e.g. /readyz's 503)
        response["description"] = DESCRIPTIONS[code]
        response["content"] = {"application/json": {"schema": _ref(body)}}
    for status, response in responses.items():
        if status.isdigit() and int(status) < 400:
            headers = response.setdefault("headers", {})
            headers.setdefault("X-Request-Id", REQUEST_ID)
            if gated:
                headers.update({k: v for k, v in RATE_HEADERS.items() if k not in headers})
            _type_bodies(response)
    operation["responses"] = dict(sorted(responses.items()))


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _type_bodies(response: dict[str, Any]) -> None:
    """Images and zips are binary, CSV text: FastAPI leaves their schema empty."""
    for media_type, content in response.get("content", {}).items():
        if content.get("schema"):
            continue
        if media_type.startswith("image/") or media_type == "application/zip":
            content.update(BINARY)
        elif media_type.startswith("text/"):
            content.update(TEXT)
