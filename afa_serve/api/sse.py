"""A minimal server-sent-events response that always closes its event source.

Unlike Starlette's StreamingResponse, this one guarantees the source generator is
closed (and so the engine requests behind it aborted) however the response ends: normally,
by a send failing, or by the server cancelling the task at shutdown. Client disconnects are
noticed by `ChoiceStreams`, which watches the connection itself.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncGenerator[bytes, None],
                 on_close: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream", headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # no proxy buffering of the stream
        })
        self._events = events
        self._on_close = on_close  # frees what the events stream from, even if it never started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._on_close()
