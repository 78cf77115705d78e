"""Running the app under uvicorn: in the foreground with a graceful SIGTERM, or in a thread.

On SIGTERM or SIGINT the server drains: it keeps listening, answers every new request (and
/health) with 503 + Retry-After, and lets the requests in flight finish for up to
`drain_timeout_s`. Then it cuts what is left: each running choice ends with a last chunk
(`finish_reason` "abort") and a stream with `data: [DONE]`, so clients get whole responses
and nothing is cancelled mid-send. Only then does uvicorn stop listening and close the idle
connections; the engine shuts down (the step it is in finishes) and `serve` returns, so the
process exits 0 within about the timeout plus one engine step. A second signal stops at once.
(uvicorn would re-raise the signal after its own graceful shutdown, which ends the process
with 128 + SIGTERM instead.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Generator, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from afa_serve.api.protocol import guarded_h11
from afa_serve.api.state import ServerState

logger = logging.getLogger(__name__)

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# after the cut, how long the cut responses may take to reach their clients
CUT_GRACE_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on a signal (see the module's docstring) and exits cleanly."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self._state = state
        self._drain_timeout_s = drain_timeout_s
        self._drain_started: float | None = None
        self._cut_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
        else:
            self.drain()

    def drain(self) -> None:
        """Start draining; the server stops when it is done (thread-safe)."""
        self._state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self._state.draining and self._drained(time.monotonic())

    def _drained(self, now: float) -> bool:
        state = self._state
        if self._drain_started is None:
            self._drain_started = now
            logger.info("draining: %d requests in flight, up to %g s", state.in_flight,
                        self._drain_timeout_s)
        if state.in_flight == 0:
            return True
        if self._cut_at is None:
            if now - self._drain_started < self._drain_timeout_s:
                return False
            logger.warning("drain timeout: ending %d requests", state.in_flight)
            state.cut.set()
            self._cut_at = now
        return now - self._cut_at >= CUT_GRACE_S

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _server(
    app: FastAPI, drain_timeout_s: float, log_level: str, **kwargs: object
) -> DrainingServer:
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        http=guarded_h11(state.options),
        h11_max_incomplete_event_size=state.options.max_header_bytes,
        timeout_graceful_shutdown=CUT_GRACE_S,  # the drain has run by then
        log_level=log_level,
        lifespan="on",
        **kwargs,
    )
    return DrainingServer(config, state, drain_timeout_s)


def serve(
    app: FastAPI, host: str, port: int, drain_timeout_s: float = 30.0, log_level: str = "info"
) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    server = _server(app, drain_timeout_s, log_level, host=host, port=port)
    server.run()  # a failed start-up (model, port) exits non-zero from inside uvicorn


@contextlib.contextmanager
def serving_in_thread(
    app: FastAPI, drain_timeout_s: float = 5.0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port from a background thread; yield its base URL.
    Leaving the block drains the server as a signal would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _server(app, drain_timeout_s, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start")
            thread.join(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.drain()
        thread.join()
        sock.close()
