"""What the API's routes and middleware share: the engine, the options, the metrics, draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from afa_serve.engine.base import Engine
from afa_serve.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ApiOptions:
    api_key: str | None = None  # when set, every route but /health needs `Bearer KEY`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass
class ServerState:
    engine: Engine
    options: ApiOptions
    metrics: ServerMetrics | None = None  # made once the engine has started
    draining: bool = False  # set on SIGTERM: new generation requests get 503
    started_at: int = field(default_factory=lambda: int(time.time()))
