"""`privlora chat` in a real pseudo-terminal: the conversation is kept across turns, `/reset`
starts over, `/exit` quits, every answer ends with a timing line, and the first answer equals
`privlora generate`'s for the same greedy question. A terminal sees the prefill's progress until
the answer starts; a pipe gets the conversation alone."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

from support.terminal import FakeTerminal
from privlora.client.assistant import Assistant, Reply
from privlora.client.chat import ANSWER, PROMPT, ChatSession, run_chat
from privlora.local import local_transport

TOKENS = 5


class Terminal:
    """A process on a pseudo-terminal, read until an expected text appears."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Everything printed up to and including the next ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    break
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def test_chat_in_a_terminal(tiny_build):
    artifact = tiny_build.artifact("bfv")
    reference = Assistant(artifact, local_transport(artifact), cache_keys=False)

    def answer(conversation) -> str:
        prompt = reference.encode(conversation)
        return "".join(reference.stream(prompt, reference.config(TOKENS), Reply(len(prompt))))

    first = answer("hello")
    second = answer([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "and then"}])
    generate = subprocess.run([sys.executable, "-m", "privlora.cli", "generate", str(artifact), "--prompt", "hello",
                               "--max-new-tokens", str(TOKENS), "--quiet"], capture_output=True, text=True)
    assert generate.stdout.removesuffix("\n") == first

    chat = Terminal([sys.executable, "-m", "privlora.cli", "chat", str(artifact), "--max-new-tokens", str(TOKENS)])
    assert "/reset starts over, /exit quits" in chat.expect("you> ")
    chat.send("hello")
    turn = chat.expect("you> ")
    assert f"assistant> {first}\r\n" in turn  # the terminal turns each newline into CR LF
    assert re.search(r"\rprefill: (\d+)/\1 private groups \[[^\]]*\]\x1b\[K\r\nassistant> ", turn), turn
    assert re.search(r"\[\d+ prompt tokens, 5 generated in [\d.]+ s: prefill [\d.]+ s, [\d.]+ tokens/s\]", turn)
    chat.send("and then")  # the second turn is answered with the first in the conversation
    assert f"assistant> {second}\r\n" in chat.expect("you> ")
    chat.send("/reset")
    assert "(conversation reset)" in chat.expect("you> ")
    chat.send("hello")  # after /reset the first answer again
    assert f"assistant> {first}\r\n" in chat.expect("you> ")
    chat.send("/exit")
    assert chat.process.wait(30) == 0


def chat_once(artifact, out: io.StringIO) -> str:
    """One greedy question through ``run_chat`` to ``out``, on a fresh in-process session: what it printed."""
    assistant = Assistant(artifact, local_transport(artifact), cache_keys=False)
    run_chat(ChatSession(assistant, max_new_tokens=TOKENS), stdin=io.StringIO("hello\n/exit\n"), out=out)
    return out.getvalue()


def answer_turn(printed: str) -> str:
    """What the chat printed for its one question: after its prompt, before its timing line."""
    return printed.split(PROMPT)[1].rstrip("\n").rpartition("\n")[0]


def test_a_terminal_sees_the_prefill_then_the_answer(tiny_build):
    artifact = tiny_build.artifact("bfv")
    groups = sum(len(r["plls"]) for r in json.loads((artifact / "manifest.json").read_text())["rounds"])
    plain = chat_once(artifact, io.StringIO())
    assert "\r" not in plain and "\x1b" not in plain and "prefill:" not in plain, plain  # a pipe: no bar
    answer = answer_turn(plain)
    assert answer.startswith(ANSWER) and len(answer) > len(ANSWER), plain
    bar, newline, after = answer_turn(chat_once(artifact, FakeTerminal())).partition("\n")
    # Redrawn in place group by group up to all of them, then the answer on a line of its own.
    assert re.fullmatch(rf"(\rprefill: \d+/{groups} private groups \[\d+:\d\d elapsed, ETA [^\]]+\]\x1b\[K)+", bar), bar
    assert re.search(rf"\rprefill: {groups}/{groups} [^\r]*$", bar), bar
    assert newline and after == answer  # the same answer as the pipe's, and no bar after it


def test_a_terminal_sees_the_pads_made_on_the_spot_before_the_prefill(tiny_build):
    """A cold pool: the wait's first phase, pads for every group, gets its own bar, ended (on its
    own line) before the prefill's bar starts."""
    artifact = tiny_build.artifact("pads")
    groups = sum(len(r["plls"]) for r in json.loads((artifact / "manifest.json").read_text())["rounds"])
    assistant = Assistant(artifact, local_transport(artifact), cache_keys=False, keep_pads=0)
    out = FakeTerminal()
    run_chat(ChatSession(assistant, max_new_tokens=TOKENS), stdin=io.StringIO("hello\n/exit\n"), out=out)
    pads, newline, rest = answer_turn(out.getvalue()).partition("\n")
    assert re.search(rf"\rpads made now: {groups}/{groups} private groups [^\r]*$", pads), pads
    assert newline and rest.startswith("\rprefill: 1/"), rest
