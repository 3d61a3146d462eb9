"""Wire models of the OpenAI-compatible API (requests validated here, responses documented)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator

from serving.settings import ALIAS_MODEL

MAX_STOP_SEQUENCES = 16
MAX_METADATA_KEYS = 16
# OpenAI documents `seed` as a signed 64-bit integer; vLLM sends it to its engine core as
# MessagePack, which has no integers beyond 64 bits (a larger seed would fail in the engine: a 500).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Lenient(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    # `developer` is OpenAI's newer name for `system`.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Lenient):
    include_usage: bool = False


ConversationId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]
_conversation_id = TypeAdapter(ConversationId)


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str = Field(
        ALIAS_MODEL,
        description=f"Base model, an adapter (model version), or `{ALIAS_MODEL}` for the active version.",
    )
    # The ranges vLLM's SamplingParams accepts. Token counts are capped by the server's limit and
    # the context (ChatService), which also cuts min_tokens to max_tokens.
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 string pairs; `conversation_id` continues a conversation."
    )
    # vLLM extensions, useful for fixed-length benchmarks.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 and values 512 characters")
        conversation_id = value.get("conversation_id")
        if conversation_id is not None:
            _conversation_id.validate_python(conversation_id)
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field the token limit came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class ChatCompareRequest(ChatCompletionRequest):
    models: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="The two model versions to compare; default: the active one and the newest other.",
    )

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("side-by-side answers are returned whole; set stream to false")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "abort"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatComparison(BaseModel):
    object: Literal["chat.comparison"] = "chat.comparison"
    id: str
    conversation_id: str
    completions: list[ChatCompletion]


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

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    ]
    path: str = Field(
        ..., min_length=1, max_length=1024, description="Folder with adapter_config.json and weights."
    )
    parent: str | None = Field(None, max_length=128, description="Model version it was trained from.")
    dataset_version: str | None = Field(None, max_length=128)
    training_run: str | None = Field(None, max_length=128)
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Evaluation metrics, as training reports them."
    )


class ModelVersionInfo(BaseModel):
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
    data: list[ModelVersionInfo]
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
