"""The HTTP edge: uvicorn's h11 protocol with limits on header size, slow clients and open
connections, so no client holds memory or sockets the app never sees.

- Headers: h11 buffers at most `max_header_bytes` of an unfinished request line and headers
  (uvicorn's default parser, httptools, buffers without bound); beyond that the client gets
  431 and the connection closes. h11 checks while it waits for more: a header block that
  arrives whole in one read is refused only beyond the size of that read (at most 256 KiB).
- Slow clients: a request must arrive whole (headers and body) within `request_timeout_s` of
  the connection opening or the previous response ending, else 408 (headers begun, not ended)
  or a closed connection (nothing sent yet, or mid-body while the app waits on it). Idle
  keep-alive connections close sooner, after uvicorn's `timeout_keep_alive` (5 s).
- Connections: beyond `max_connections` open at once, a new one gets 503 and is closed.
  (uvicorn's `limit_concurrency` answers 503 only once a request has arrived, and keeps the
  connection.)
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from afa_serve.api.state import ApiOptions


def _raw_response(status: int, reason: str, message: str, code: str,
                  error_type: str = "invalid_request_error") -> bytes:
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, options: ApiOptions, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._options = options
        self._request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._options.max_connections:
            self._refuse(_raw_response(
                503, "Service Unavailable", "Too many open connections; retry shortly.",
                "too_many_connections", "service_unavailable"))
            return
        self._arm_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_request_timer()  # for the next request on this connection

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) <= self._options.max_header_bytes:
            return super().send_400_response(msg)
        self._refuse(_raw_response(
            431, "Request Header Fields Too Large",
            f"The request line and headers are larger than this server's limit of "
            f"{self._options.max_header_bytes} bytes.", "request_header_fields_too_large"))

    def _arm_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self.loop.call_later(
            self._options.request_timeout_s, self._on_request_timeout)

    def _on_request_timeout(self) -> None:
        if self.transport.is_closing():
            return
        receiving = self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
        if receiving and self.conn.trailing_data[0]:  # part of a request line or headers
            self._refuse(_raw_response(
                408, "Request Timeout",
                f"The request did not arrive within {self._options.request_timeout_s:g} s.",
                "request_timeout"))
        elif receiving or self.conn.their_state is h11.SEND_BODY:
            # nothing sent (a 408 could cross a request a client sends on an idle connection),
            # or mid-body, where the app waiting on the body hears a disconnect
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        self.transport.write(response)
        self.transport.close()


def guarded_h11(options: ApiOptions) -> Any:
    """The protocol factory for `uvicorn.Config(http=...)`, with these options' limits."""
    return functools.partial(GuardedH11Protocol, options=options)
