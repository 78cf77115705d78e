"""Plain ASGI middleware (no BaseHTTPMiddleware: it would get in the way of streaming and of
noticing disconnects): request counting, API key, draining, and the body size limit.

Outermost first: count -> API key -> draining (and counting what is in flight) -> body limit
-> the app. So refusals from the inner three are counted, and a body is read only for a caller
holding the key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afa_serve.api.errors import APIError, invalid_request, unavailable
from afa_serve.api.state import ServerState
from afa_serve.metrics import ServerMetrics

GENERATION_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})
COUNTED_ENDPOINTS = GENERATION_ENDPOINTS | {"/v1/models"}
PUBLIC_PATHS = frozenset({"/health"})


def endpoint_label(path: str) -> str | None:
    """The `endpoint` label of a path; None for paths that are not counted."""
    if path in COUNTED_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return None


class CountRequests:
    """afa_serve_requests_total{endpoint, status} for the API endpoints."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], ServerMetrics | None]):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = endpoint_label(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        status = 500  # if the app raises before answering, the server answers 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                metrics.count_request(endpoint, status)


class RequireApiKey:
    """`Authorization: Bearer KEY` on every path but /health, when a key is configured; the
    scheme's case does not matter (RFC 7235), the key's does."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(b" "),
                                                                  self.expected):
            return await self.app(scope, receive, send)
        error = APIError(
            401,
            "Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
            type="invalid_request_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


class RefuseWhileDraining:
    """Once the server is shutting down, 503 + Retry-After for every new request (/health
    says so itself); counts the requests being answered, for the drain to wait on."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        if self.state.draining:
            error = unavailable("The server is shutting down; retry on another instance.")
            return await error.response()(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class LimitBodySize:
    """413 for a body over `max_bytes`, by its Content-Length or as it streams in.

    The body is read here (it would be anyway) and handed on whole; after it, `receive`
    is the server's own again, so the app still hears the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(
            413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await invalid_request("Invalid Content-Length header.").response()(
                    scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self._too_large().response()(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large().response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole_body: Message | None = {
            "type": "http.request", "body": b"".join(chunks), "more_body": False
        }

        async def replay_then_receive() -> Message:
            nonlocal whole_body
            if whole_body is not None:
                message, whole_body = whole_body, None
                return message
            return await receive()

        await self.app(scope, replay_then_receive, send)
