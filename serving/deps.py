"""FastAPI dependencies: what route handlers get from app.state, as short Annotated aliases.

The trivial ones are `async def`: FastAPI runs a plain `def` dependency in its thread pool, and
two thread hops per request cost more than the whole rating handler.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from feedback.service import FeedbackService
from loopchat.settings import Settings
from monitoring.metrics import ExperimentMetrics, FeedbackMetrics
from rollout.experiments import ExperimentService
from serving.access import ANONYMOUS, Principal
from serving.adapters import AdapterSet
from serving.chat import ChatService
from serving.engine.base import ChatEngine
from serving.errors import APIError
from serving.registry_sync import RegistryWatcher


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> ChatEngine:
    return request.app.state.engine


def serving_ready(state) -> bool:
    """The engine serves and this process has applied the registry (or found it unreachable)."""
    return state.engine.ready and getattr(state, "registry_synced", False)


async def require_ready(request: Request) -> None:
    if not serving_ready(request.app.state):
        raise APIError(
            503,
            "The model is still loading; retry shortly.",
            code="engine_not_ready",
            headers={"Retry-After": "5"},
        )


async def get_principal(request: Request) -> Principal:
    """The API key's holder (AccessMiddleware), or nobody in particular in development mode."""
    return getattr(request.state, "principal", ANONYMOUS)


async def get_adapters(request: Request) -> AdapterSet:
    return request.app.state.adapters


async def get_chat_service(request: Request) -> ChatService:
    return request.app.state.chat


async def get_feedback(request: Request) -> FeedbackService:
    return request.app.state.feedback


async def get_feedback_metrics(request: Request) -> FeedbackMetrics:
    return request.app.state.feedback_metrics


async def get_experiment_metrics(request: Request) -> ExperimentMetrics:
    return request.app.state.experiment_metrics


async def get_database(request: Request) -> Engine:
    return request.app.state.database


async def get_experiments(request: Request) -> ExperimentService:
    return request.app.state.experiments


async def get_watcher(request: Request) -> RegistryWatcher:
    return request.app.state.watcher


_bearer = HTTPBearer(auto_error=False)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = request.app.state.settings.admin_token
    if credentials is None:
        raise APIError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    # Constant-time comparison: the token is a secret.
    if token is None or not hmac.compare_digest(
        credentials.credentials.encode(), token.get_secret_value().encode()
    ):
        raise APIError(403, "invalid admin token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[ChatEngine, Depends(get_engine)]
AdaptersDep = Annotated[AdapterSet, Depends(get_adapters)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
FeedbackMetricsDep = Annotated[FeedbackMetrics, Depends(get_feedback_metrics)]
ExperimentMetricsDep = Annotated[ExperimentMetrics, Depends(get_experiment_metrics)]
DatabaseDep = Annotated[Engine, Depends(get_database)]
ExperimentsDep = Annotated[ExperimentService, Depends(get_experiments)]
WatcherDep = Annotated[RegistryWatcher, Depends(get_watcher)]
ReadyDep = Depends(require_ready)
AdminDep = Depends(require_admin)
