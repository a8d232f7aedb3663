"""One account's load costs another a bounded factor: evaluation turns go to the least-served
caller (in time) with a cap per caller, and a caller's requests in progress are capped before their
bodies are read. Budgets are keyed by the adapter's content, so two builds of one adapter draw
on one budget."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from websockets.sync.client import connect

from support.live import LiveServer
from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import SecureClient
from privlora.client.transports import HttpTransport, TransportError
from privlora.core.artifact import adapter_key, artifact_id
from privlora.core.wire import RateLimitError
from privlora.local import InProcessTransport
from privlora.server.accounts import AccountLimits, AccountStore
from privlora.server.fairness import FairLimits, FairQueue
from privlora.server import http
from privlora.server.hosting import Hosting
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def grant_order(queue: FairQueue, callers: list[str]) -> list[str]:
    """Callers ask for a turn in this order while the first holds one; the order they get theirs."""
    order, release, threads = [], threading.Event(), []

    def one(caller: str, hold: bool) -> None:
        with queue.turn(caller):
            order.append(caller)
            if hold:
                release.wait(10)

    for position, caller in enumerate(callers):
        threads.append(threading.Thread(target=one, args=(caller, position == 0)))
        threads[-1].start()
        _wait_until(lambda: len(order) == 1 and queue.waiting() == position)
    release.set()
    for thread in threads:
        thread.join(10)
    return order


def test_the_least_served_caller_goes_next():
    queue = FairQueue(FairLimits(workers=1, per_caller=1))
    order = grant_order(queue, ["attacker"] * 5 + ["victim"])
    assert order.index("victim") == 1  # right after the turn in progress, before the attacker's queue


def test_control_without_callers_told_apart_the_victim_waits_for_everything():
    queue = FairQueue(FairLimits(workers=1, per_caller=1))
    order = grant_order(queue, ["everyone"] * 6)
    assert len(order) == 6  # one caller: first come, first served, the last asker waits for all five


def test_a_caller_holds_at_most_its_share_of_turns():
    queue = FairQueue(FairLimits(workers=4, per_caller=1))
    running, peak, lock = [0], [0], threading.Lock()

    def one() -> None:
        with queue.turn("attacker"):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.02)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 1  # control: the same eight with per_caller=4 run up to four at once
    queue = FairQueue(FairLimits(workers=4, per_caller=4))
    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] > 1


def test_requests_in_progress_are_capped_per_caller():
    queue = FairQueue(FairLimits(requests=3))
    held = [queue.request("attacker") for _ in range(3)]
    for slot in held:
        slot.__enter__()
    with pytest.raises(RateLimitError, match="at most 3"):
        with queue.request("attacker"):
            pass
    with queue.request("victim"):  # another caller is not refused
        assert queue.in_progress() == 4
    held[0].__exit__(None, None, None)
    with queue.request("attacker"):  # room again once one is answered
        pass


PROMPT = [5, 6, 7, 8]
CONFIG = GenerationConfig(max_new_tokens=4)


def test_two_builds_of_one_adapter_draw_on_one_budget(tiny_build, tmp_path):
    bfv, pads = tiny_build.artifact("bfv"), tiny_build.artifact("pads")
    assert artifact_id(bfv) != artifact_id(pads) and adapter_key(bfv) == adapter_key(pads)
    store = AccountStore(tmp_path / "accounts.db", create=True)
    token = store.create("alice", AccountLimits(max_rows=len(PROMPT) + CONFIG.max_new_tokens - 1))  # one answer
    hosting = Hosting([PrivateServer(bfv, SessionLimits(), store), PrivateServer(pads, SessionLimits(), store)])
    first = SecureClient(bfv, InProcessTransport(hosting, token), cache_keys=False)
    assert len(list(generate(first, PROMPT, CONFIG))) == CONFIG.max_new_tokens
    second = SecureClient(pads, InProcessTransport(hosting, token), cache_keys=False)
    with pytest.raises(TransportError) as refused:  # keyed by artifact, this would have been a fresh budget
        list(generate(second, PROMPT, CONFIG))
    assert refused.value.code == "budget_exhausted"
    assert set(store.site_rows("alice", adapter_key(bfv)).values()) == {len(PROMPT) + CONFIG.max_new_tokens - 1}


def test_an_in_process_server_does_no_background_work_beside_its_own_client(tiny_build):
    """In process, the server's idle time is its client's working time: no thread fills bfv's pool
    of encryptions of zero there (it slowed the client's public segments by half)."""
    from privlora.local import local_transport

    artifact = tiny_build.artifact("bfv")
    local = local_transport(artifact)
    list(generate(SecureClient(artifact, local, cache_keys=False), PROMPT, CONFIG))
    assert local.hosting.first.backend.filler.thread is None
    served = PrivateServer(artifact, SessionLimits())  # control: a served artifact fills its pool when idle
    SecureClient(artifact, InProcessTransport(served), cache_keys=False)
    assert served.backend.filler.thread is not None and served.backend.filler.thread.is_alive()


def _long_turn_and_a_victim(pauses: bool) -> tuple[int, int]:
    """An attacker's turn of 50 units of work (with or without pause points between them) and a
    victim asking for a turn once the attacker has begun: the units done before the victim got in."""
    from privlora.core.turns import pause_point

    queue = FairQueue(FairLimits(workers=1, per_caller=1))
    done, started, got_in = [0], threading.Event(), []

    def attacker() -> None:
        with queue.turn("attacker"):
            started.set()
            for _ in range(50):
                time.sleep(0.005)
                done[0] += 1
                if pauses:
                    pause_point()

    def victim() -> None:
        with queue.turn("victim"):
            got_in.append(done[0])

    first = threading.Thread(target=attacker)
    first.start()
    started.wait(10)
    second = threading.Thread(target=victim)
    second.start()
    first.join(10)
    second.join(10)
    return got_in[0], done[0]


def test_a_long_evaluation_hands_its_turn_over_at_its_pause_points():
    got_in, total = _long_turn_and_a_victim(pauses=True)
    assert got_in < total // 2  # the victim ran long before the attacker's work ended
    got_in, total = _long_turn_and_a_victim(pauses=False)  # control: no pause points, the victim waits it out
    assert got_in == total


@pytest.mark.parametrize("pause", [1.0, 0.0], ids=["paused", "control-no-pause"])
def test_a_refusal_for_too_many_in_progress_comes_after_its_retry_after(tiny_build, monkeypatch, pause):
    """A client that retries a 429 at once is held to one refusal per Retry-After: measured, the
    refusal's delay; control, without the pause it comes at once (and a flood of retries costs
    the server a connection, a token check and an answer each)."""
    monkeypatch.setattr(http, "REFUSAL_PAUSE_SECONDS", pause)
    live = LiveServer(tiny_build.artifact("plain"), fair=FairLimits(requests=1))
    client = SecureClient(tiny_build.artifact("plain"), HttpTransport(live.url), cache_keys=False)
    try:
        stream = connect(f"{live.url.replace('http', 'ws')}/v1/sessions/{client.session}/stream")  # holds the one slot
        group = next(iter(client.groups.values()))[0]
        route = f"{live.url}/v1/sessions/{client.session}/rounds/{group.round}/{group.index}/0"
        start = time.perf_counter()
        refused = httpx.post(route, content=b"", timeout=30)
        took = time.perf_counter() - start
        stream.close()
    finally:
        client.close()
        live.stop()
    assert refused.status_code == 429 and refused.headers["retry-after"] == f"{pause:g}"
    assert (took >= 0.95) == (pause == 1.0), took


class SlicedByPausePoints(FairQueue):
    """The control: turns round-robin across callers and handed over at every pause point while
    another caller waits, whatever either has been served (the queue before virtual time)."""

    def _next(self):
        if sum(self._running.values()) >= self.limits.workers:
            return None
        for caller, tickets in self._waiting.items():
            if self._running[caller] < self.limits.per_caller:
                return caller, tickets[0]
        return None

    def _pause(self, caller, held):
        with self._cond:
            if not any(other != caller for other in self._waiting):
                return
        self._release(caller, held, paused=True)
        self._wait(caller, next(self._tickets), first=True)
        held.since = time.monotonic()


def _attacker_units_during_a_victims_turn(queue: FairQueue) -> int:
    """An attacker that always waits with long units of work (30 ms, a pause point after each) and
    a victim whose turn is 10 short units (1 ms, a pause point after each): the attacker's units
    done while the victim's turn lasted."""
    from privlora.core.turns import pause_point

    done, stop, spans = [0], threading.Event(), []

    def attacker() -> None:
        while not stop.is_set():
            with queue.turn("attacker"):
                for _ in range(20):
                    time.sleep(0.03)
                    done[0] += 1
                    pause_point()

    def victim() -> None:
        with queue.turn("victim"):
            start = done[0]
            for _ in range(10):
                time.sleep(0.001)
                pause_point()
            spans.append(done[0] - start)

    threads = [threading.Thread(target=attacker) for _ in range(2)]  # one always waiting
    for thread in threads:
        thread.start()
    _wait_until(lambda: done[0] >= 3)
    victim()
    stop.set()
    for thread in threads:
        thread.join(10)
    return spans[0]


def test_turns_are_shared_in_time_so_short_work_runs_straight_through():
    assert _attacker_units_during_a_victims_turn(FairQueue()) <= 1
    assert _attacker_units_during_a_victims_turn(SlicedByPausePoints()) >= 9  # control: a slice of its work at each pause
