from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.deps import serving_ready

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it may still be loading the model)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "engine not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """200 once the engine serves requests and the registry's versions are loaded; 503 while
    loading or after a failure."""
    state = request.app.state
    if serving_ready(state):
        return JSONResponse({"status": "ready", "model": state.engine.model_name})
    error = getattr(state, "engine_error", None)
    if error is None and getattr(state, "registry_synced", False):
        error = "the engine stopped serving"  # it was ready once: not loading any more
    return JSONResponse(
        {"status": "failed" if error else "loading", "detail": error},
        status_code=503,
        headers={"Retry-After": "5"},
    )
