"""Domain errors: raised by the package that knows what went wrong, mapped to a response once.

Each kind carries the HTTP status and OpenAI error `code` a client gets for it; `serving.errors`
turns any `LoopchatError` into OpenAI's error body, and the CLI prints its message. Domain code
never builds HTTP errors itself.
"""

from __future__ import annotations

from typing import ClassVar


class LoopchatError(Exception):
    """An error the caller can act on. `param` names the request field at fault, when known."""

    status: ClassVar[int] = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidInputError(LoopchatError, ValueError):
    status = 400
    code = "invalid_value"


class NotFoundError(LoopchatError, LookupError):
    status = 404
    code = "not_found"


class ConflictError(LoopchatError, ValueError):
    status = 409
    code = "conflict"


class UnavailableError(LoopchatError):
    """Storage or a dependency is down for now; `retry_after_s` tells the client when to retry."""

    status = 503
    code = "service_unavailable"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: int = 5
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class ModelNotFoundError(NotFoundError):
    """A model (version) name that is not served or not registered; `name` is the name asked for."""

    code = "model_not_found"

    def __init__(self, name: str, *, param: str | None = "model") -> None:
        super().__init__(f"The model `{name}` does not exist.", param=param)
        self.name = name


class AdapterLoadError(InvalidInputError):
    """An adapter folder that cannot be served (bad config, rank, base model or weights)."""

    code = "invalid_adapter"

    def __init__(self, message: str, *, param: str | None = "path") -> None:
        super().__init__(message, param=param)
