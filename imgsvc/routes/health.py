"""GET /healthz (process up), GET /readyz (database + default models loaded, how each loaded
upscale model runs its convolutions, which models lack their weights), GET /v1/models
(generated from the model table)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from imgsvc.models.registry import DEFAULT_UPSCALE_MODEL, Registry
from imgsvc.routes.deps import DatabaseDep, RegistryDep
from imgsvc.routes.openapi import ReadyStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database reachable and default models loaded; models without weights",
    responses={
        200: {"model": ReadyStatus},
        503: {"model": ReadyStatus, "description": "Not ready: `reason` says why."},
    },
)
async def readyz(request: Request, db: DatabaseDep) -> JSONResponse:
    def ping() -> None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(ping)
    except SQLAlchemyError:
        return JSONResponse({"status": "unready", "reason": "database unreachable"}, 503)
    state = request.app.state
    registry: Registry = state.context.registry
    if state.load_error:
        missing = await run_in_threadpool(_missing_weights, registry)
        body = {"status": "unready", "reason": state.load_error, "missing_weights": missing}
        return JSONResponse(body, 503)
    if not state.models_ready:
        return JSONResponse({"status": "starting", "reason": "loading models"}, 503)
    models = [
        {"operation": op, "name": name, "convolution_path": path}
        for op, name, path in registry.loaded_models()
    ]
    missing = await run_in_threadpool(_missing_weights, registry)
    body = {
        "status": "ready",
        "device": registry.device.device,
        "models": models,
        "missing_weights": missing,
    }
    return JSONResponse(body)


def _missing_weights(registry: Registry) -> list[dict[str, str | None]]:
    """The known models whose weights are not installed, and what to add for each."""
    table = registry.table()
    missing: list[dict[str, str | None]] = [
        {"operation": op, "name": name, "path": entry.path, "note": entry.note}
        for op, entries in table.items()
        for name, entry in entries.items()
        if not entry.present
    ]
    if DEFAULT_UPSCALE_MODEL not in table["upscale"]:  # upscale rows are the files present
        path = f"upscale/{DEFAULT_UPSCALE_MODEL}.safetensors"
        note = f"add weights/{path} (`imgsvc weights pull`) to use it"
        missing.append(
            {"operation": "upscale", "name": DEFAULT_UPSCALE_MODEL, "path": path, "note": note}
        )
    return missing


@router.get("/v1/models", tags=["models"], summary="Every operation's models and their weights")
async def models(registry: RegistryDep) -> dict[str, list[dict[str, object]]]:
    infos = await run_in_threadpool(registry.list_models)
    return {"data": [asdict(i) for i in infos]}
