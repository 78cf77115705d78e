"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.

Client mistakes get a 4xx that says what is wrong (400 instead of FastAPI's 422); a full
queue or a draining server a 429/503 with Retry-After; anything else is a real fault: a 500
in the same format, logged with its traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from afa_serve.api.schemas import ErrorDetail, ErrorResponse
from afa_serve.engine.base import EngineClosedError, InvalidRequestError, QueueFullError

logger = logging.getLogger(__name__)


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error message may quote client text that is not valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error the API answers with, in OpenAI's format."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(
            ErrorResponse(error=self.detail).model_dump(),
            status_code=self.status_code,
            headers=self.headers,
        )


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist on this server.", param="model",
        code="model_not_found",
    )


def overloaded(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429, message, type="rate_limit_error", code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(
        503, message, type="service_unavailable", code="shutting_down",
        headers={"Retry-After": str(retry_after_s)},
    )


def from_engine_error(
    error: InvalidRequestError | QueueFullError | EngineClosedError,
    param_names: dict[str, str] | None = None,
) -> APIError:
    """The HTTP answer to an engine's refusal; `param_names` renames the engine's params."""
    if isinstance(error, QueueFullError):
        return overloaded(str(error), error.retry_after_s)
    if isinstance(error, EngineClosedError):
        return unavailable(str(error))
    param = error.param
    if param is not None and param_names:
        param = param_names.get(param, param)
    return invalid_request(str(error), param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_field_name(part: object) -> bool:
    """Field names are snake_case; pydantic's union-member tags are type names ("str",
    "list[int]", "TextPart", "function-after[...]")."""
    return (isinstance(part, str) and part.isidentifier() and part[0].islower()
            and part not in _TYPE_TAGS)


def _param_of(location: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content", "list[...]", 1, "type=image_url")` ->
    "messages[0].content[1]": union-member tags are left out."""
    fields = list(location[1:]) if location and location[0] == "body" else list(location)
    param = ""
    for part in fields:
        if isinstance(part, int):
            param += f"[{part}]"
        elif _is_field_name(part):
            param += f".{part}" if param else part
    return param or None


def _is_type_mismatch(error: dict[str, Any]) -> bool:
    return error.get("type", "").endswith("_type") or error.get("type") == "none_required"


def _real_cause(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The error to report, of those about the first offending parameter. A union reports one
    error per member; the member the client meant is one whose type matched (a list of parts,
    not a string, when a part is refused), and of those the one that got furthest in."""
    top = errors[0].get("loc", ())[:2]
    return max((e for e in errors if e.get("loc", ())[:2] == top),
               key=lambda e: (not _is_type_mismatch(e), len(e.get("loc", ()))))


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 for a body that failed validation, naming the first offending parameter."""
    if not errors:
        return invalid_request("invalid request body")
    first = _real_cause(errors)
    location = first.get("loc", ())
    param = _param_of(location)
    if first.get("type") == "extra_forbidden":
        name = param or (str(location[-1]) if location else "")
        return invalid_request(f"Unrecognized request argument supplied: {name}", name)
    if first.get("type") == "json_invalid":
        return invalid_request("The request body is not valid JSON.", None)
    if first.get("type") == "missing" and param is None:
        return invalid_request("The request needs a JSON body.", None)
    message = str(first.get("msg", "invalid value"))
    if param is not None:
        message = f"{param}: {message}"
    return invalid_request(message, param)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return error.response()


async def _request_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return validation_error(error.errors()).response()


_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


async def _http_exception(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method, unparsable body) in OpenAI's format."""
    assert isinstance(error, StarletteHTTPException)
    status = error.status_code
    if status >= 500:
        return await _internal_error(request, error)
    return APIError(
        status, str(error.detail), type=_HTTP_TYPES.get(status, "invalid_request_error"),
        headers=error.headers,
    ).response()


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.error(
        "internal error on %s %s", request.method, request.url.path, exc_info=error
    )
    return APIError(
        500, "The server had an internal error while processing your request.",
        type="server_error",
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _internal_error)
