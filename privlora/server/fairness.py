"""Fair shares of a server among its callers, so that one account's load costs another a bounded
factor: each caller (an account; without accounts, a session) holds at most ``per_caller`` of
the ``workers`` evaluation turns at once, turns go to the caller that has been served least, and
a caller has at most ``requests`` requests in progress (being read, waiting or evaluated): one
more is refused (429) before its body is read, so waiting work is bounded in memory too.

Why turns and not threads: the SEAL bindings hold the GIL, so evaluations in threads share one
core however many run; what bounds a victim's slowdown is how many of the attacker's
evaluations run beside its own, and how long it waits for a turn.

Served least, in time: each active caller has a virtual time, the seconds of turns it has held
(start-time fair queuing, as an operating system's fair scheduler does). A long evaluation hands
its turn over at a pause point (``core/turns.py``) once it is a quantum ahead of a waiting
caller. A caller that was idle comes back two quanta behind the least-served active one, so a
caller whose requests come one at a time (a decode step's groups) preempts a caller with a queue
at its next pause point and runs its short work straight through; it cannot bank more than that
by staying idle, and a caller that keeps the server busy is served in turn like any other.
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
    quantum_seconds: float = 0.01  # how far ahead of a waiting caller a turn runs before it is handed over


@dataclass
class _Held:
    since: float  # when the turn was granted, or taken back after a pause


class FairQueue:
    def __init__(self, limits: FairLimits = FairLimits()) -> None:
        self.limits = limits
        self._cond = threading.Condition()
        self._in_progress: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[int]] = OrderedDict()  # ties go to the caller waiting longest
        self._served: dict[str, float] = {}  # each active caller's virtual time (seconds of turns held)
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
        """Wait for an evaluation turn (the least-served caller first, each caller's oldest request
        first), then hold it for the block, handing it over at the work's pause points while
        another caller is owed it."""
        self._wait(caller, next(self._tickets), first=False)
        held = _Held(time.monotonic())
        try:
            with pausing(lambda: self._pause(caller, held)):
                yield
        finally:
            self._release(caller, held)

    def _wait(self, caller: str, ticket: int, first: bool) -> None:
        with self._cond:
            if caller not in self._served:
                self._place(caller)
            tickets = self._waiting.setdefault(caller, deque())
            if first:
                tickets.appendleft(ticket)  # a paused request resumes before its caller's later ones
            else:
                tickets.append(ticket)
            self._cond.wait_for(lambda: self._next() == (caller, ticket))
            self._grant(caller)

    def _place(self, caller: str) -> None:
        """A caller becoming active starts two quanta behind the least-served active caller."""
        active = [served for other, served in self._served.items() if other != caller]
        self._served[caller] = min(active) - 2 * self.limits.quantum_seconds if active else 0.0

    def _release(self, caller: str, held: _Held, paused: bool = False) -> None:
        with self._cond:
            self._served[caller] += time.monotonic() - held.since
            self._running[caller] -= 1
            if not self._running[caller]:
                del self._running[caller]
                if not paused and caller not in self._waiting:
                    del self._served[caller]  # idle: it comes back placed afresh
            self._cond.notify_all()

    def _pause(self, caller: str, held: _Held) -> None:
        """Hand the turn over if a waiting caller is owed it (this turn is a quantum ahead of it),
        and wait for it to come back."""
        with self._cond:
            now = self._served[caller] + time.monotonic() - held.since
            if not any(now - self._served[other] > self.limits.quantum_seconds
                       for other in self._waiting if other != caller):
                return
        self._release(caller, held, paused=True)
        self._wait(caller, next(self._tickets), first=True)
        held.since = time.monotonic()

    def _next(self) -> tuple[str, int] | None:
        """The caller and ticket whose turn comes next, if a turn is free: the least-served caller
        below its share of turns."""
        if sum(self._running.values()) >= self.limits.workers:
            return None
        eligible = [caller for caller in self._waiting if self._running[caller] < self.limits.per_caller]
        if not eligible:
            return None
        caller = min(eligible, key=lambda c: self._served[c])  # min keeps the first of equals: the longest waiting
        return caller, self._waiting[caller][0]

    def _grant(self, caller: str) -> None:
        tickets = self._waiting.pop(caller)
        tickets.popleft()
        if tickets:
            self._waiting[caller] = tickets  # behind the other waiting callers among equals
        self._running[caller] += 1
        self._cond.notify_all()

    def in_progress(self) -> int:
        with self._cond:
            return sum(self._in_progress.values())

    def waiting(self) -> int:
        """Requests waiting for a turn, all callers together."""
        with self._cond:
            return sum(len(tickets) for tickets in self._waiting.values())
