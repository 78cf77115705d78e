"""Running the app under uvicorn: in the foreground with a graceful SIGTERM, or in a thread.

On SIGTERM or SIGINT the foreground server marks itself draining (new generation requests
get 503 + Retry-After, /health turns 503), stops listening, lets in-flight requests finish
for up to `drain_timeout_s`, cancels what is left, shuts the engine down and returns, so the
process exits 0. (uvicorn would re-raise the signal after its own graceful shutdown, which
ends the process with 128 + SIGTERM instead.)
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Generator, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from afa_serve.api.state import ServerState

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that tells the app it is draining and exits cleanly on a signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)

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


def _config(
    app: FastAPI, drain_timeout_s: float, log_level: str, **kwargs: object
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        timeout_graceful_shutdown=drain_timeout_s,
        log_level=log_level,
        lifespan="on",
        **kwargs,
    )


def serve(
    app: FastAPI, host: str, port: int, drain_timeout_s: float = 30.0, log_level: str = "info"
) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    server = DrainingServer(
        _config(app, drain_timeout_s, log_level, host=host, port=port), app.state.server
    )
    server.run()  # a failed start-up (model, port) exits non-zero from inside uvicorn


@contextlib.contextmanager
def serving_in_thread(
    app: FastAPI, drain_timeout_s: float = 5.0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port from a background thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DrainingServer(_config(app, drain_timeout_s, log_level), app.state.server)
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
        server.should_exit = True
        thread.join()
        sock.close()
