"""Fair shares of a server among its callers, so that one account's load costs another a bounded
factor: each caller (an account; without accounts, a session) holds at most ``per_caller`` of
the ``workers`` evaluation turns at once, waiting turns are handed out round-robin across
callers, and a caller has at most ``requests`` requests in progress (being read, waiting or
evaluated): one more is refused (429) before its body is read, so waiting work is bounded in
memory too.

Why turns and not threads: the SEAL bindings hold the GIL, so evaluations in threads share one
core however many run; what bounds a victim's slowdown is how many of the attacker's
evaluations run beside its own, and how long it waits for a turn. Turns are shared in time (a
quantum), not in pause points: a caller whose work pauses often would otherwise wait a whole slice
of another's long work at each of its own pause points.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from privlora.core.turns import pausing
from privlora.core.wire import RateLimitError


@dataclass(frozen=True)
class FairLimits:
    workers: int = 1  # evaluations at once, all callers together (SEAL holds the GIL: one is what runs)
    per_caller: int = 1  # evaluations at once of one caller
    requests: int = 8  # requests one caller may have in progress; more are refused (429)
    # A turn is handed over at a pause point only after it has run this long: turns are shared in
    # time, so that a caller's short evaluations (a decode step's groups) run straight through
    # while another's long one waits at most this much (plus one unit of work) per handover.
    quantum_seconds: float = 0.02


@dataclass
class _Held:
    since: float  # when the turn was granted, or last given back after a pause


class FairQueue:
    def __init__(self, limits: FairLimits = FairLimits()) -> None:
        self.limits = limits
        self._cond = threading.Condition()
        self._in_progress: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[int]] = OrderedDict()  # callers in round-robin order
        self._tickets = itertools.count()

    @contextmanager
    def request(self, caller: str) -> Iterator[None]:
        """One request in progress for ``caller``, from before its body is read to its answer;
        RateLimitError when the caller already has its maximum."""
        with self._cond:
            if self._in_progress[caller] >= self.limits.requests:
                raise RateLimitError(f"too many requests in progress: at most {self.limits.requests} at once "
                                     "per account")
            self._in_progress[caller] += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_progress[caller] -= 1
                if not self._in_progress[caller]:
                    del self._in_progress[caller]

    @contextmanager
    def turn(self, caller: str) -> Iterator[None]:
        """Wait for an evaluation turn (the caller's oldest request first, callers in turn), then
        hold it for the block; at each of the work's pause points (``core/turns.py``) the turn goes
        to another caller that is waiting, and comes back in its turn."""
        self._wait(caller, next(self._tickets), first=False)
        held = _Held(time.monotonic())
        try:
            with pausing(lambda: self._pause(caller, held)):
                yield
        finally:
            self._release(caller)

    def _wait(self, caller: str, ticket: int, first: bool) -> None:
        with self._cond:
            tickets = self._waiting.setdefault(caller, deque())
            if first:
                tickets.appendleft(ticket)  # a paused request resumes before its caller's later ones
            else:
                tickets.append(ticket)
            self._cond.wait_for(lambda: self._next() == (caller, ticket))
            self._grant(caller)

    def _release(self, caller: str) -> None:
        with self._cond:
            self._running[caller] -= 1
            if not self._running[caller]:
                del self._running[caller]
            self._cond.notify_all()

    def _pause(self, caller: str, held: _Held) -> None:
        """Hand the turn over if it has run its quantum and another caller waits for one, and wait
        for it to come back."""
        if time.monotonic() - held.since < self.limits.quantum_seconds:
            return
        with self._cond:
            if not any(other != caller for other in self._waiting):
                return
        self._release(caller)
        self._wait(caller, next(self._tickets), first=True)
        held.since = time.monotonic()

    def _next(self) -> tuple[str, int] | None:
        """The caller and ticket whose turn comes next, if a turn is free."""
        if sum(self._running.values()) >= self.limits.workers:
            return None
        for caller, tickets in self._waiting.items():  # round-robin: the least recently served first
            if self._running[caller] < self.limits.per_caller:
                return caller, tickets[0]
        return None

    def _grant(self, caller: str) -> None:
        tickets = self._waiting.pop(caller)
        tickets.popleft()
        if tickets:
            self._waiting[caller] = tickets  # back of the round-robin order
        self._running[caller] += 1
        self._cond.notify_all()

    def in_progress(self) -> int:
        with self._cond:
            return sum(self._in_progress.values())

    def waiting(self) -> int:
        """Requests waiting for a turn, all callers together."""
        with self._cond:
            return sum(len(tickets) for tickets in self._waiting.values())
