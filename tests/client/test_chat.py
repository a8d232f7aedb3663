"""`privlora chat` in a real pseudo-terminal: the conversation is kept across turns, `/reset`
starts over, `/exit` quits, every answer ends with a timing line, and the first answer equals
`privlora generate`'s for the same greedy question."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from privlora.client.assistant import Assistant, Reply
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
    assert re.search(r"\[\d+ prompt tokens, 5 generated in [\d.]+ s: prefill [\d.]+ s, [\d.]+ tokens/s\]", turn)
    chat.send("and then")  # the second turn is answered with the first in the conversation
    assert f"assistant> {second}\r\n" in chat.expect("you> ")
    chat.send("/reset")
    assert "(conversation reset)" in chat.expect("you> ")
    chat.send("hello")  # after /reset the first answer again
    assert f"assistant> {first}\r\n" in chat.expect("you> ")
    chat.send("/exit")
    assert chat.process.wait(30) == 0

