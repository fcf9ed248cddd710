"""GET /healthz (process up), GET /readyz (database + default models loaded, and how each
loaded upscale model runs its convolutions), GET /v1/models (generated from the model table)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from imgsvc.routes.deps import DatabaseDep, RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database reachable and default models loaded")
async def readyz(request: Request, db: DatabaseDep) -> JSONResponse:
    def ping() -> None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(ping)
    except SQLAlchemyError:
        return JSONResponse({"status": "unready", "reason": "database unreachable"}, 503)
    state = request.app.state
    if state.load_error:
        return JSONResponse({"status": "unready", "reason": state.load_error}, 503)
    if not state.models_ready:
        return JSONResponse({"status": "starting", "reason": "loading models"}, 503)
    registry = request.app.state.context.registry
    models = [
        {"operation": op, "name": name, "convolution_path": path}
        for op, name, path in registry.loaded_models()
    ]
    return JSONResponse({"status": "ready", "device": registry.device.device, "models": models})


@router.get("/v1/models", tags=["models"], summary="Every operation's models and their weights")
async def models(registry: RegistryDep) -> dict[str, list[dict[str, object]]]:
    infos = await run_in_threadpool(registry.list_models)
    return {"data": [asdict(i) for i in infos]}
