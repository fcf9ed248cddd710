"""GET /metrics: the Prometheus text format; behind `Authorization: Bearer <IMGSVC_METRICS_TOKEN>`
when that token is set."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from imgsvc import metrics
from imgsvc.errors import Unauthorized
from imgsvc.routes.deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}},
            "description": "Prometheus text exposition format (version 0.0.4)",
        },
        401: {"description": "IMGSVC_METRICS_TOKEN is set and the bearer token is not it"},
    },
)
async def scrape(
    settings: SettingsDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <IMGSVC_METRICS_TOKEN>` when that is set")
    ] = None,
) -> Response:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if token:
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise Unauthorized("/metrics needs `Authorization: Bearer <IMGSVC_METRICS_TOKEN>`")
    body = await run_in_threadpool(generate_latest, metrics.REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
