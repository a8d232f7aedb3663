"""A chat over one artifact: the conversation through the base model's chat template, secure
generation, and the answer as text that streams while tokens are decoded. ``privlora chat`` and
``privlora gateway`` both speak through it.

Text is released as soon as it is final: a token that ends inside a multi-byte character, or
text that may be the start of a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from privlora.core.artifact import CLIENT, TOKENIZER_DIR, artifact_id, load_bundle
from privlora.errors import PrivloraError
from privlora.runtime.client import SecureClient
from privlora.runtime.generation import GenerationConfig, check_context, generate
from privlora.runtime.tokenizer import Message, load_client_tokenizer
from privlora.runtime.transport import Transport

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

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: the tokens after the first over the time after it."""
        if self.first_token_s is None or len(self.tokens) < 2 or self.seconds <= self.first_token_s:
            return None
        return (len(self.tokens) - 1) / (self.seconds - self.first_token_s)


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


class Assistant:
    """One artifact's chat, on one session that every answer reuses (answers run one at a time)."""

    def __init__(self, artifact: str | Path, transport: Transport, name: str | None = None,
                 cache_keys: bool = True) -> None:
        bundle = load_bundle(artifact, CLIENT)
        tokenizer_dir = bundle.root / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise PrivloraError(f"{artifact} has no tokenizer in its client bundle")
        self.tokenizer = load_client_tokenizer(tokenizer_dir)
        self.name = name or Path(artifact).absolute().name  # as the user named it (a link keeps its name)
        self.artifact_id = artifact_id(artifact)
        self.context_length = int(bundle.manifest["model"]["context_length"])
        self.client = SecureClient(artifact, transport, cache_keys=cache_keys, bundle=bundle)
        self.eos = () if self.tokenizer.eos_token_id is None else (self.tokenizer.eos_token_id,)

    def encode(self, conversation: str | Sequence[Message]) -> list[int]:
        """The conversation's prompt tokens, through the chat template (ready for the answer)."""
        return self.tokenizer.encode_chat(conversation)

    def config(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature or 1.0, top_p=top_p, eos_token_ids=self.eos, seed=seed)

    def stream(self, prompt: list[int], config: GenerationConfig, reply: Reply,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the answer's text in pieces as they become final, filling ``reply``."""
        check_context(len(prompt), config.max_new_tokens, self.context_length)
        stops = [s for s in stop if s]
        start, emitted, text = time.perf_counter(), 0, ""
        try:
            for token in generate(self.client, prompt, config):
                if reply.first_token_s is None:
                    reply.first_token_s = time.perf_counter() - start
                if token in self.eos:
                    reply.finish_reason = "stop"
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
            reply.seconds = time.perf_counter() - start
