"""An SSE response frees what its events come from however it ends, even before they start."""

from __future__ import annotations

from afa_serve.api.sse import EventStreamResponse


async def test_the_stream_is_closed_when_the_first_send_fails():
    closed = []

    async def events():
        try:
            yield b"data: 1\n\n"
        finally:  # never reached: the generator never starts
            closed.append("generator")

    async def on_close():
        closed.append("streams")

    async def broken_send(message):
        raise OSError("the client went away")

    response = EventStreamResponse(events(), on_close=on_close)
    await response({"type": "http"}, None, broken_send)
    assert closed == ["streams"]
