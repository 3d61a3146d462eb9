"""One OpenAI-shaped error body for every route; no stack trace or internal path reaches a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loopchat.errors import LoopchatError
from serving.engine.base import EngineError
from serving.protocol import ErrorResponse, error_body

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error meant for the client, with its status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def vllm_error(response) -> APIError:
    """vLLM's ErrorResponse as loopchat's error: OpenAI's `type` for the status and a string
    `code` (vLLM puts the status number there)."""
    error = response.error
    status = int(error.code)
    message = error.message
    if "maximum context length" in message or "than max_model_len" in message:
        code = "context_length_exceeded"
    elif status == 404:
        code = "model_not_found" if "model" in message.lower() else "not_found"
    elif status >= 500:
        # The engine's own words stay in the server's log (and the completion's row).
        message, code = "internal server error", "internal_error"
    else:
        code = "invalid_value" if error.param else "invalid_request"
    return APIError(status, message, param=error.param, code=code)


def vllm_exception_error(exc: Exception) -> APIError:
    """An exception raised by vLLM's serving code as loopchat's error, mapped by the function
    vLLM's own server maps it with."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return vllm_error(create_error_response(exc))


async def vllm_call(work: Awaitable[T]) -> T:
    """What a call into vLLM's serving classes returned; its errors, returned (an ErrorResponse)
    or raised, raised as loopchat's APIError (chained to what vLLM raised, for the log)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VLLMErrorResponse

    try:
        answer: Any = await work
    except Exception as exc:
        error = vllm_exception_error(exc)
        if error.status >= 500:
            logger.error("vLLM's serving layer failed: %r", exc)
        raise error from exc
    if isinstance(answer, VLLMErrorResponse):
        raise vllm_error(answer)
    return answer


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the error body under each status it can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}


# OpenAPI for routes that stream server-sent events when asked to.
EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def request_header(scope, name: bytes) -> bytes | None:
    """One request header's raw value from an ASGI scope (names are lower case); None if absent.
    A scan of the few headers, cheaper than building a dict on every request."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BodySizeLimit:
    """Refuses a request body over `max_bytes` with 413, by its Content-Length, or for a body
    without one (chunked) once the bytes read pass the cap; nothing of it is parsed or stored."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = request_header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:  # the server holds the client to its Content-Length
                await self.app(scope, receive, send)
            return
        # No length given: read up to the cap first, then hand the body on.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_of(loc: tuple) -> str | None:
    # ("body", "messages", 0, "role") -> "messages[0].role"
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing":
        message = "field required"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def domain_error(exc: LoopchatError) -> APIError:
    """The one place a domain error becomes the client's error: its status, code and param."""
    retry = getattr(exc, "retry_after_s", None)
    headers = None if retry is None else {"Retry-After": str(retry)}
    return APIError(exc.status, exc.message, param=exc.param, code=exc.code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LoopchatError)
    async def _domain_error(_: Request, exc: LoopchatError) -> JSONResponse:
        return domain_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return JSONResponse(
            error_body(message, _TYPES.get(exc.status_code, "server_error")),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(EngineError)
    async def _engine_unavailable(_: Request, exc: EngineError) -> JSONResponse:
        # The engine cannot take the request now (still starting, or it could not be rebuilt with
        # the LoRA room the version needs): worth retrying later.
        return APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "10"}).response()

    # vLLM's request models check some rules (tools with tool_choice, n with beam search...) in
    # validators that raise vLLM's own errors: answered as vLLM's server answers them.
    from vllm.exceptions import VLLMError

    @app.exception_handler(VLLMError)
    async def _vllm_error(_: Request, exc: VLLMError) -> JSONResponse:
        return vllm_exception_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal server error", "server_error", code="internal_error"),
            status_code=500,
        )


# Error responses every route of a kind can give, whatever the route: documented once here.
_COMMON_ERRORS = {
    "/v1/": {
        "400": "Invalid request",
        "401": "Missing, invalid or revoked API key",
        "403": "The key may not call this route or origin",
        "413": "Request body too large",
        "429": "The key's rate or in-flight limit; see Retry-After",
        "503": "Starting up, storage or the engine unavailable; see Retry-After",
    },
    "/admin/": {
        "400": "Invalid request",
        "401": "Missing admin token",
        "403": "Invalid admin token",
        "413": "Request body too large",
    },
}


def document_errors(app: FastAPI) -> None:
    """The OpenAPI schema as the service answers: FastAPI documents a 422 the error handlers turn
    into 400, and knows nothing of the middleware's 401, 403, 413 and 429."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        reference = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, operations in schema.get("paths", {}).items():
            common = next(
                (errors for prefix, errors in _COMMON_ERRORS.items() if path.startswith(prefix)), {}
            )
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in common.items():
                    responses.setdefault(
                        status,
                        {"description": description, "content": {"application/json": {"schema": reference}}},
                    )
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
