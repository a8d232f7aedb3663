"""A chat over one artifact: the conversation through the base model's chat template, secure
generation, and the answer as text that streams while tokens are decoded. ``privlora chat`` and
``privlora gateway`` both speak through it, and so does ``privlora generate`` (a raw prompt,
and the prompt checked before the session is opened).

Text is released as soon as it is final: a token that ends inside a multi-byte character, or
text that may be the start of a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from privlora.core.artifact import CLIENT, TOKENIZER_DIR, artifact_id, load_bundle
from privlora.errors import PrivloraError
from privlora.progress import Progress
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, check_context, generate
from privlora.client.timings import OfflineStats, StepStats, answer_report, offline_since
from privlora.client.tokenizer import Message, load_client_tokenizer
from privlora.client.transports import Transport
from privlora.client.view import server_view

log = logging.getLogger("privlora.client")

INCOMPLETE = "\ufffd"  # what the decoder shows for the first bytes of a character cut short


@dataclass
class Reply:
    """One answer as it is produced: its tokens and text, why it ended and when."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # the answer's tokens, without the eos
    text: str = ""
    finish_reason: str | None = None  # "stop": an eos or a stop string; "length": max tokens
    first_token_s: float | None = None  # from the request to the first token (the prefill)
    seconds: float = 0.0
    eos_token: int | None = None  # the eos that ended the answer (not in ``tokens``)
    steps: list[StepStats] = field(default_factory=list)  # one per generated token, the prefill first
    offline: OfflineStats = field(default_factory=OfflineStats)  # pads made since the previous answer
    server_view: dict[str, Any] | None = None  # what the server received for one group of the last token

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: the tokens after the first over the time after it."""
        if self.first_token_s is None or len(self.tokens) < 2 or self.seconds <= self.first_token_s:
            return None
        return (len(self.tokens) - 1) / (self.seconds - self.first_token_s)

    @property
    def generated(self) -> list[int]:
        """Every token the model produced: ``tokens`` and the eos that ended them, if one did."""
        return self.tokens if self.eos_token is None else [*self.tokens, self.eos_token]

    def report(self) -> dict[str, Any]:
        """What the answer took, measured: its speed, and what privacy cost it online and offline."""
        return {"first_token_s": self.first_token_s, "tokens_per_second": self.tokens_per_second,
                "seconds": self.seconds, **answer_report(self.steps, self.offline), "server_view": self.server_view}


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could still become a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-length:]):
                longest = length
                break
    return longest


def _stop_at(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first stop string in ``text`` begins, looking from ``start`` on."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


class _Wait:
    """The wait before an answer's first token, reported as it goes: to a bar per phase (pads made
    on the spot, then the prefill; each group counted) and to a listener of every group."""

    LABELS = {"pads": "pads made now", "prefill": "prefill"}

    def __init__(self, groups: int, stream: TextIO | None, listener: Callable[[str, int, int], None] | None) -> None:
        self.groups, self.stream, self.listener = groups, stream, listener
        self.bar: Progress | None = None
        self.done = {"pads": 0, "prefill": 0}

    def advance(self, phase: str) -> None:
        self.done[phase] += 1
        if self.stream is not None:
            if self.bar is None or self.bar.label != self.LABELS[phase]:  # a new phase: the last one's bar ends
                self.close()
                self.bar = Progress(self.groups, self.LABELS[phase], "private groups", self.stream)
            self.bar.advance()
        if self.listener is not None:
            self.listener(phase, self.done[phase], self.groups)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def abandon(self) -> None:
        if self.bar is not None:
            self.bar.abandon()
            self.bar = None


FIRST_PADS = 64  # rows every group gets before any gets more: an answer that stops the keeper early finds some


class PadKeeper:
    """Keeps a client's pads topped up between turns, in a background thread, while the user
    reads or types. The SEAL bindings hold the GIL, so the thread never overlaps a turn: a turn
    stops it at the next group and waits for it. A failure is logged and left to the turn's own
    cold path."""

    def __init__(self, client: SecureClient, rows: int) -> None:
        self.client, self.rows = client, rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.client.pads is None or not self.rows:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="privlora-pads", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.client.prepare(self.rows, stop=self._stop.is_set, first=FIRST_PADS)
        except PrivloraError as exc:
            log.warning("pads were not made ahead of time: %s", exc)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @property
    def making(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        self._stop.set()
        self.wait()
        self._thread = None


class Assistant:
    """One artifact's chat, on one session that every answer reuses (answers run one at a time).

    Made without a transport, it has the tokenizer and the model's limits only, so that a prompt
    can be refused before any key or session; :meth:`connect` then opens the session. With
    ``keep_pads``, a backend with pads keeps that many rows per group ready between answers. With
    ``record``, every answer's (x, delta) rows are saved to that transcript directory."""

    client: SecureClient  # set by connect()

    def __init__(self, artifact: str | Path, transport: Transport | None = None, name: str | None = None,
                 cache_keys: bool = True, keep_pads: int = 0, record: str | Path | None = None) -> None:
        self._artifact, self._cache_keys, self._keep_pads, self._record = artifact, cache_keys, keep_pads, record
        self._keeper: PadKeeper | None = None
        self._bundle = bundle = load_bundle(artifact, CLIENT)
        tokenizer_dir = bundle.root / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise PrivloraError(f"{artifact} has no tokenizer in its client bundle")
        self.tokenizer = load_client_tokenizer(tokenizer_dir)
        self.name = name or Path(artifact).absolute().name  # as the user named it (a link keeps its name)
        self.artifact_id = artifact_id(artifact)
        self.context_length = int(bundle.manifest["model"]["context_length"])
        self.eos = () if self.tokenizer.eos_token_id is None else (self.tokenizer.eos_token_id,)
        if transport is not None:
            self.connect(transport)

    def connect(self, transport: Transport) -> SecureClient:
        """Check that the server runs this artifact, load (or make) the keys, open the session."""
        self.client = SecureClient(self._artifact, transport, cache_keys=self._cache_keys, bundle=self._bundle)
        if self._record is not None:
            self.client.record(self._record)
        self._offline_seen = OfflineStats()  # the client's pads total when the last answer ended
        self._keeper = PadKeeper(self.client, self._keep_pads)
        self._keeper.start()  # while the user types the first message
        return self.client

    def wait_for_pads(self) -> None:
        """Until the pads being made between answers are ready (benchmarks, tests)."""
        if self._keeper is not None:
            self._keeper.wait()

    def pads(self) -> dict[str, Any] | None:
        """The pads pool as the user's next answer will find it: rows ready in every group, the
        rows kept ready between answers, and whether more are being made (None without pads)."""
        ready = self.client.pads_ready()
        if ready is None:
            return None
        return {"ready": ready, "kept": self._keep_pads, "making": self._keeper is not None and self._keeper.making}

    def close(self) -> None:
        """Stop making pads, then end the session."""
        if self._keeper is not None:
            self._keeper.pause()
        self.client.close()

    def encode(self, conversation: str | Sequence[Message]) -> list[int]:
        """The conversation's prompt tokens, through the chat template (ready for the answer)."""
        return self.tokenizer.encode_chat(conversation)

    def encode_raw(self, text: str) -> list[int]:
        """A text as is, without the chat template: with the tokenizer's own special tokens (a BOS
        when it adds one), as Hugging Face encodes it."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def check(self, prompt: list[int], config: GenerationConfig) -> None:
        """Refuse a prompt that, with the tokens asked for, does not fit the model's context."""
        check_context(len(prompt), config.max_new_tokens, self.context_length)

    def config(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature or 1.0, top_p=top_p, eos_token_ids=self.eos, seed=seed)

    def stream(self, prompt: list[int], config: GenerationConfig, reply: Reply, stop: Sequence[str] = (),
               on_first_token: Callable[[], None] | None = None, progress: TextIO | None = None,
               on_wait: Callable[[str, int, int], None] | None = None) -> Iterator[str]:
        """Yield the answer's text in pieces as they become final, filling ``reply``;
        ``on_first_token`` is called once the prefill is done, before any text. The wait before
        it is reported as it goes: with ``progress``, the prefill's private groups are counted
        there (a bar on a terminal, one line in a log), ending before ``on_first_token``; and
        ``on_wait(phase, done, total)`` hears of each group's pads made on the spot ("pads") and
        each group of the prefill ("prefill")."""
        self.check(prompt, config)
        if self._keeper is not None:
            self._keeper.pause()
        stops = [s for s in stop if s]
        start, emitted, text, first_step = time.perf_counter(), 0, "", len(self.client.steps)
        self.client.last_sent = None
        wait = _Wait(self.client.groups_per_step, progress, on_wait)
        self.client.on_pads, self.client.on_group = partial(wait.advance, "pads"), partial(wait.advance, "prefill")
        try:
            for token in generate(self.client, prompt, config):
                if reply.first_token_s is None:
                    reply.first_token_s = time.perf_counter() - start
                    self.client.on_pads = self.client.on_group = None  # the decode steps are not the wait's
                    wait.close()
                    if on_first_token is not None:
                        on_first_token()
                if token in self.eos:
                    reply.finish_reason, reply.eos_token = "stop", token
                    break
                reply.tokens.append(token)
                text = self.tokenizer.decode(reply.tokens, skip_special_tokens=True)
                cut = _stop_at(text, stops, max(0, emitted - max((len(s) for s in stops), default=0)))
                if cut is not None:
                    text, reply.finish_reason = text[:cut], "stop"
                    break
                incomplete = len(text) - len(text.rstrip(INCOMPLETE))
                final = len(text) - max(incomplete, _held_back(text, stops))
                if final > emitted:
                    yield text[emitted:final]
                    emitted = final
            else:
                reply.finish_reason = "length"
            if len(text) > emitted:
                yield text[emitted:]
            reply.text = text
        finally:
            if reply.first_token_s is None:  # the wait failed
                wait.abandon()
            self.client.on_pads = self.client.on_group = None
            reply.seconds = time.perf_counter() - start
            if self.client.recorder is not None:
                self.client.recorder.save()
            reply.steps = self.client.steps[first_step:]
            if self.client.last_sent is not None:
                reply.server_view = server_view(self.client.crypto, self.client.last_sent)
            reply.offline = offline_since(self.client.offline, self._offline_seen)
            self._offline_seen = replace(self.client.offline)  # read while no pads are being made
            if self._keeper is not None:
                self._keeper.start()
