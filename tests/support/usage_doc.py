"""docs/usage.md as a script. Its console blocks' commands (``$ ...`` lines) run in order in a
scratch folder, with the project's ``privlora`` on PATH; a command ending in ``&`` is a server,
started in the background and awaited on its ``--port``. What each printed (stdout and stderr)
must show the lines the page shows, in order, up to the figures: numbers (with their units),
hashes, tokens and times may differ; words and layout may not. A ``...`` in a shown line stands
for anything. A command shown printing ``privlora: error:`` must fail; every other must succeed.
A block preceded by an HTML comment ``<!-- not run: why -->`` is not run.

``python tests/support/usage_doc.py DIR [--refresh]`` runs the page by hand; ``--refresh`` writes
each command's real output back into the page (where the page shows it whole, without ``...``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "usage.md"
NOT_RUN = "<!-- not run"
SERVER_WAIT_SECONDS = 600  # a server loads its artifacts before it listens
COMMAND_SECONDS = 900
ENV_FILE = ".usage-doc-env"
BACKGROUND = re.compile(r"\s&\s*(#.*)?$")  # `command &`, perhaps with a comment after it
# Figures that change from run to run: a number with its unit, a hash, an API token, a time of day.
FIGURE = re.compile(r"plk_[\w-]+|\b[0-9a-f]{12,}\b|\d+(?:[.,:]\d+)*(?:e[-+]?\d+)?(?: ?(?:[kKMG]?B|ms|s)\b)?")


@dataclass
class Command:
    text: str  # the shell command, continuations joined
    shown: list[str]  # the output the page shows after it
    span: tuple[int, int]  # where that output is in the page (lines, end excluded)
    background: bool = False
    output: str = ""  # what it printed when run
    returncode: int | None = None


def commands(page: str) -> list[Command]:
    """Every command of every console block that is run, with the output shown after it."""
    lines, found, block, skip, previous = page.splitlines(), [], False, False, ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```console"):
            block, skip = True, previous.startswith(NOT_RUN)
        elif line.startswith("```"):
            block = False
        elif block and not skip and line.startswith("$ "):
            text = line[2:]
            while text.endswith("\\") or text.count("'") % 2:  # a continued line, or an open quote
                index += 1
                text = text[:-1] + " " + lines[index].strip() if text.endswith("\\") else text + "\n" + lines[index]
            start = index + 1
            while index + 1 < len(lines) and not lines[index + 1].startswith(("$ ", "```")):
                index += 1
            server = BACKGROUND.search(text)
            found.append(Command(text[:server.start()] if server else text.strip(), lines[start:index + 1],
                                 (start, index + 1), server is not None))
        if line.strip():
            previous = line
        index += 1
    return found


def _normal(line: str) -> str:
    return " ".join(FIGURE.sub("#", line).split())


def _pattern(shown: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(_normal(part)) for part in shown.split("...")))


def missing(shown: list[str], printed: str) -> str | None:
    """The first shown line (in order) that the printed output does not have, up to figures."""
    actual = [_normal(line) for line in printed.splitlines()]
    position = 0
    for line in shown:
        if not line.strip() or line.strip() == "...":
            continue
        pattern = _pattern(line)
        while position < len(actual) and not pattern.fullmatch(actual[position]):
            position += 1
        if position == len(actual):
            return line
        position += 1
    return None


def _port(command: str) -> int:
    found = re.search(r"--port[ =](\d+)", command)
    return int(found[1]) if found else (8080 if " gateway " in f" {command} " else 8000)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Session:
    """The page's commands run in one folder, servers kept running until ``close``."""

    folder: Path
    env: dict[str, str] = field(default_factory=lambda: {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    servers: list[tuple[Command, subprocess.Popen, Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env["PRIVLORA_CACHE_DIR"] = str(self.folder / "cache")  # keys and artifacts of this run only

    def run(self, command: Command) -> None:
        if command.background:
            return self._start(command)
        script = command.text
        exported = command.text.startswith("export ")
        if exported:  # the variables it sets stay for the next commands, as in the reader's shell
            script += f"\nenv -0 > {ENV_FILE}"
        done = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=self.folder, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=COMMAND_SECONDS,
                              stdin=subprocess.DEVNULL)
        command.output, command.returncode = done.stdout, done.returncode
        if exported and done.returncode == 0:
            pairs = (self.folder / ENV_FILE).read_text().split("\0")
            self.env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)

    def _start(self, command: Command) -> None:
        log = self.folder / f"server-{len(self.servers)}.log"
        process = subprocess.Popen(["bash", "-c", command.text], cwd=self.folder, env=self.env,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((command, process, log))
        port, deadline = _port(command.text), time.monotonic() + SERVER_WAIT_SECONDS
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"`{command.text}` did not listen on {port}:\n{log.read_text()}")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop the servers (as Ctrl-C would), then read what they printed."""
        for command, process, log in self.servers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            command.output, command.returncode = log.read_text(), 0


def check(command: Command) -> str | None:
    """What is wrong with a command's run against the page, if anything."""
    fails = any("privlora: error:" in line for line in command.shown)
    if not command.background and (command.returncode != 0) != fails:
        return f"`{command.text}` exited {command.returncode}:\n{command.output}"
    line = missing(command.shown, command.output)
    if line is not None:
        return f"`{command.text}` did not print, in order, the line\n  {line}\nit printed:\n{command.output}"
    return None


def run_page(folder: Path, page: Path = PAGE) -> list[Command]:
    session, ran = Session(folder), []
    try:
        for command in commands(page.read_text()):
            session.run(command)
            ran.append(command)
    finally:
        session.close()
    return ran


def refresh(page: Path, ran: list[Command]) -> None:
    """Each command's real output in place of the page's, where the page shows it whole."""
    lines = page.read_text().splitlines()
    for command in sorted(ran, key=lambda c: c.span, reverse=True):
        if not command.background and not any("..." in line for line in command.shown):
            start, end = command.span
            lines[start:end] = [line.rstrip() for line in command.output.rstrip("\n").splitlines()]
    page.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    results = run_page(folder)
    for command in results:
        print(f"$ {command.text}  [exit {command.returncode}]\n{command.output}")
        print(f"-- {check(command) or 'as the page shows'}\n")
    if "--refresh" in sys.argv:
        refresh(PAGE, results)
