"""Wire models of loopchat's own routes (the chat and completion requests are vLLM's: see
serving/chat_protocol.py) and the OpenAI error body."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loopchat.names import VersionName


class ChatComparison(BaseModel):
    object: Literal["chat.comparison"] = "chat.comparison"
    id: str
    conversation_id: str
    # Two chat completions, each as /v1/chat/completions returns it.
    completions: list[dict[str, Any]]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loopchat"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class AdapterLoadRequest(BaseModel):
    """Register a LoRA adapter as a new model version (loaded here first to validate it)."""

    model_config = ConfigDict(extra="forbid")

    name: VersionName
    path: str = Field(
        ..., min_length=1, max_length=1024, description="Folder with adapter_config.json and weights."
    )
    parent: str | None = Field(None, max_length=128, description="Model version it was trained from.")
    dataset_version: str | None = Field(None, max_length=128)
    training_run: str | None = Field(None, max_length=128)
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Evaluation metrics, as training reports them."
    )


class RegisteredVersion(BaseModel):
    """A registry entry, with whether this process has it loaded."""

    name: str
    base_model: str
    adapter_path: str
    parent: str | None = None
    dataset_version: str | None = None
    training_run: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    status: str
    status_reason: str | None = None
    created_at: datetime
    updated_at: datetime
    loaded: bool = False
    load_error: str | None = None


class ModelVersionList(BaseModel):
    data: list[RegisteredVersion]
    count: int


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(..., min_length=1, description="Candidate variant -> percent.")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str | None = Field(None, max_length=128, description="Candidate variant; needed with several.")
    reason: str = Field("", max_length=1000)


class ActiveModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
