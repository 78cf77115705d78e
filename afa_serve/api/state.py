"""What the API's routes and middleware share: the engine, the options, the metrics, draining."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from afa_serve.api.admission import Admission
from afa_serve.engine.base import Engine
from afa_serve.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class ApiOptions:
    api_key: str | None = None  # when set, every route but /health needs `Bearer KEY`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_origins: tuple[str, ...] = ()  # CORS: web origins that may call the API
    # the edge, enforced by afa_serve.api.protocol: request line and headers, the time to
    # receive a whole request, open connections
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        check_api_key(self.api_key)


def check_api_key(key: str | None) -> None:
    """The API key's one rule, for these options and the server's settings alike: none (serve
    without a key) or a key that is not blank."""
    if key is not None and not key.strip():
        raise ValueError("the API key is empty: set a key, or leave it unset to serve without one")


@dataclass
class ServerState:
    engine: Engine
    options: ApiOptions
    metrics: ServerMetrics | None = None  # made once the engine has started
    admission: Admission | None = None  # made once the engine has started
    # prompts longer than this many characters cannot fit the context (made at start-up)
    max_prompt_chars: int | None = None
    draining: bool = False  # set on SIGTERM: new requests get 503
    in_flight: int = 0  # HTTP requests being answered (those refused while draining aside)
    cut: asyncio.Event = field(default_factory=asyncio.Event)  # set at the drain timeout
    started_at: int = field(default_factory=lambda: int(time.time()))
