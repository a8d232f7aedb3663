"""``privlora chat``: an interactive conversation in the terminal. The conversation is kept
across turns (each turn sends it whole through the chat template), a terminal sees the prefill's
progress until the answer starts, tokens are printed as they are decoded, and every answer ends
with a one-line timing summary. ``/reset`` starts over, ``/exit`` (or end of input) quits."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from privlora.errors import PrivloraError
from privlora.client.assistant import Assistant, Reply
from privlora.client.generation import answer_length

PROMPT = "you> "
ANSWER = "assistant> "


@dataclass
class ChatSession:
    assistant: Assistant
    system: str | None = None
    max_new_tokens: int | None = None  # None: the default, as for generate and the gateway
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str, out: TextIO) -> Reply:
        """Add the user's turn, print the answer as it comes, keep it in the conversation. A turn
        that fails (too long for the context, a server refusal) leaves the conversation as it was."""
        conversation = [*self.messages, {"role": "user", "content": text}]
        assistant = self.assistant
        prompt = assistant.encode(conversation)
        room = assistant.context_length - len(prompt)  # a long conversation's answers get shorter
        length = answer_length(self.max_new_tokens, len(prompt), assistant.context_length)
        config = assistant.config(min(length, max(room, 1)), self.temperature, self.top_p, self.seed)
        reply = Reply(prompt_tokens=len(prompt))

        def answering() -> None:  # at the first token: until then a terminal's line is the prefill's bar
            out.write(ANSWER)
            out.flush()

        # A pipe or a test gets the answer alone: only a terminal sees the prefill's progress.
        for piece in assistant.stream(prompt, config, reply, on_first_token=answering,
                                      progress=out if out.isatty() else None):
            out.write(piece)
            out.flush()
        out.write("\n")
        self.messages = [*conversation, {"role": "assistant", "content": reply.text}]
        return reply


def summary(reply: Reply) -> str:
    speed = f", {reply.tokens_per_second:.2f} tokens/s" if reply.tokens_per_second else ""
    prefill = f"prefill {reply.first_token_s:.2f} s" if reply.first_token_s is not None else "no tokens"
    return f"[{reply.prompt_tokens} prompt tokens, {len(reply.tokens)} generated in {reply.seconds:.2f} s: {prefill}{speed}]"


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    assistant = session.assistant
    out.write(f"privlora chat: {assistant.name} ({assistant.client.backend_name}; your messages are encrypted before "
              "they leave this machine). /reset starts over, /exit quits.\n")
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        try:
            reply = session.answer(text, out)
        except KeyboardInterrupt:
            out.write("\n(answer interrupted; the conversation is as before it)\n")
            continue
        except PrivloraError as exc:
            out.write(f"\n(error: {exc}; /reset starts over)\n")
            continue
        out.write(summary(reply) + "\n")
    session.assistant.close()
