"""The chat and completion requests: vLLM's own request models (every parameter `vllm serve`
accepts, validated by vLLM) with what loopchat adds: the alias as default model and `metadata`.

Kept apart from serving/protocol.py because importing vLLM takes seconds: only the serving app
needs these.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StringConstraints, TypeAdapter, field_validator
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VLLMChatCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VLLMCompletionRequest

from loopchat.names import ALIAS_MODEL

MAX_METADATA_KEYS = 16
# OpenAI documents `seed` as a signed 64-bit integer (vLLM validates the range).
SEED_MAX = 2**63 - 1

ConversationId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]
_conversation_id = TypeAdapter(ConversationId)


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
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


def _model_field() -> Any:
    return Field(
        ALIAS_MODEL,
        description=f"Base model, an adapter (model version), or `{ALIAS_MODEL}` for the active version.",
    )


def _user_field() -> Any:
    return Field(None, max_length=256, description="The end user, for the log and the A/B assignment.")


class ChatCompletionRequest(VLLMChatCompletionRequest):
    model: str | None = _model_field()
    user: str | None = _user_field()
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 string pairs; `conversation_id` continues a conversation."
    )

    _metadata = field_validator("metadata")(_check_metadata)

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        # Read past pydantic's deprecation warning: `max_tokens` is still what many clients send.
        return self.__dict__.get("max_tokens")

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
    def _no_stream(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("side-by-side answers are returned whole; set stream to false")
        return value


class CompletionRequest(VLLMCompletionRequest):
    model: str | None = _model_field()
    user: str | None = _user_field()
