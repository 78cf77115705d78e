"""Admission of a response's choices, all or none, against what the engine can hold.

An engine holds `max_num_seqs + max_queue` requests at once (running and waiting) and refuses
more with `QueueFullError`. A response with n choices over several prompts is that many engine
requests: admitted one by one, a full engine would prefill some choices and refuse the rest.
So the API reserves all of a response's choices here first: a response that can never fit is
a 400 naming `n`; one that does not fit now is a 429 before any choice reaches the engine.
A reservation is released once its engine requests have finished or been aborted, so the
engine always has room for every choice admitted here.
"""

from __future__ import annotations

from afa_serve.api.errors import invalid_request, overloaded


class Admission:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.reserved = 0

    def reserve(self, num_choices: int) -> Reservation:
        """Hold `num_choices` engine slots, or answer 400 (they never fit) or 429 (not now).
        Runs on the event loop with no await: the check and the hold are one step."""
        if num_choices > self.capacity:
            raise invalid_request(
                f"This request asks for {num_choices} choices (n times the number of "
                f"prompts); this server holds at most {self.capacity} at once. Lower n or "
                "send fewer prompts.", "n")
        if self.reserved + num_choices > self.capacity:
            raise overloaded(
                f"The server is at capacity ({self.reserved} of {self.capacity} requests "
                f"held; this one needs {num_choices}); retry shortly.", retry_after_s=1)
        self.reserved += num_choices
        return Reservation(self, num_choices)


class Reservation:
    """Slots held for one response; `release()` is idempotent."""

    def __init__(self, admission: Admission, size: int):
        self._admission = admission
        self._size = size

    def release(self) -> None:
        self._admission.reserved -= self._size
        self._size = 0
