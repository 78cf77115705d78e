"""The engine streams behind one HTTP request, merged, and watched for the client leaving.

A response has one engine request per choice (n > 1, batched prompts). `ChoiceStreams`
starts them all, waits for each one's first delta before the response starts (the engine
refuses a request - queue full, too long - before its first delta, and the client should get
that refusal as an HTTP status, not inside a 200 stream), then yields `(choice index, delta)`
as they come, interleaved. It also waits on the client's connection: when the client goes
away it raises `ClientDisconnected` at once, and closing the streams aborts every engine
request still running, so their slots are free before the engine's next step.

When the server's drain times out (`cut` is set), every choice still running ends at once
with a last delta of its own, `finish_reason` "abort", so the response ends as a response
should (a stream with its last chunk and `data: [DONE]`); a response not yet started gets 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio

from afa_serve.api.prompting import Choice
from afa_serve.engine.base import Delta, Engine, EngineClosedError

Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientDisconnected(Exception):
    """The client closed its connection before the response was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone (call after the body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next(iterator: AsyncIterator[Delta]) -> Delta:
    try:
        return await anext(iterator)
    except StopAsyncIteration:  # the contract: the last delta has a finish_reason
        raise RuntimeError("the engine's stream ended without a finish_reason") from None


class ChoiceStreams:
    """The deltas of a response's engine requests, merged: `start()`, iterate, `aclose()`."""

    def __init__(
        self,
        engine: Engine,
        choices: list[Choice],
        receive: Receive,
        observe: Callable[[Delta], None] = lambda delta: None,
        cut: asyncio.Event | None = None,
        release: Callable[[], None] = lambda: None,
    ):
        self._engine = engine
        self._choices = choices
        self._iterators: list[AsyncIterator[Delta]] = [
            engine.generate(choice.request) for choice in choices
        ]
        self._observe = observe
        self._disconnect = asyncio.create_task(wait_for_disconnect(receive))
        self._cut = asyncio.create_task((cut or asyncio.Event()).wait())
        self._release = release  # called once, when closed
        self._pending: dict[asyncio.Task[Delta], int] = {}
        self._abandoned: list[asyncio.Task[Delta]] = []  # waits given up at the cut
        self._last: dict[int, Delta] = {}
        self._ready: deque[tuple[int, Delta]] = deque()
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._closed = False

    async def start(self) -> None:
        """Wait for every choice's first delta; on a refusal or failure, close all and raise it."""
        try:
            for position in range(len(self._iterators)):
                self._schedule(position)
            while len(self._started) < len(self._iterators):
                await self._collect()
        except BaseException:
            await self.aclose()
            raise

    def _schedule(self, position: int) -> None:
        self._pending[asyncio.create_task(_next(self._iterators[position]))] = position

    async def _collect(self) -> None:
        """Wait for deltas (or the client leaving) and queue them in choice order."""
        done, _ = await asyncio.wait(
            [*self._pending, self._disconnect, self._cut], return_when=asyncio.FIRST_COMPLETED
        )
        if self._disconnect in done:
            raise ClientDisconnected()
        for future in sorted(done - {self._cut}, key=self._pending.__getitem__):
            position = self._pending.pop(future)
            delta = future.result()  # an engine refusal or failure propagates from here
            self._started.add(position)
            self._add(position, delta)
            if delta.finished:
                self._finished.add(position)
            else:
                self._schedule(position)
        if self._cut in done:
            self._end_unfinished()

    def _add(self, position: int, delta: Delta) -> None:
        self._last[position] = delta
        self._observe(delta)
        self._ready.append((self._choices[position].index, delta))

    def _end_unfinished(self) -> None:
        """End each running choice with a last delta of its own; its engine request is aborted
        on close."""
        if len(self._started) < len(self._iterators):
            raise EngineClosedError("the server is shutting down; retry on another instance")
        now = time.monotonic()
        for future, position in sorted(self._pending.items(), key=lambda item: item[1]):
            future.cancel()
            last = self._last[position]
            self._add(position, replace(
                last, token_ids=(), text="", finish_reason="abort", stop_reason=None,
                logprobs=None if last.logprobs is None else (), prompt_logprobs=None,
                timings=replace(last.timings, finished=now)))
        self._abandoned += self._pending
        self._pending.clear()

    def __aiter__(self) -> ChoiceStreams:
        return self

    async def __anext__(self) -> tuple[int, Delta]:
        while not self._ready:
            if not self._pending:
                raise StopAsyncIteration
            await self._collect()
        return self._ready.popleft()

    async def aclose(self) -> None:
        """Stop waiting, close every engine stream and abort what still runs (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            waiting = [*self._pending, *self._abandoned, self._disconnect, self._cut]
            for future in waiting:
                future.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            self._pending.clear()
            self._abandoned.clear()
            for position, iterator in enumerate(self._iterators):
                await iterator.aclose()
                if position not in self._finished:
                    await self._engine.abort(self._choices[position].request.request_id)
            self._release()
