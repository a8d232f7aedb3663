"""A compile says what it is doing: one line per phase, in order, each with its seconds, on
stderr; a log gets plain lines (no carriage return), a terminal sees each phase redrawn in place
while it runs and the same lines when they end; ``quiet`` (a library caller, ``--quiet``) prints
nothing. The tiny Llama of ``tiny_build``, compiled for the plain backend."""

from __future__ import annotations

import json
import re
import sys

from support.terminal import FakeTerminal
from privlora.cli import main
from privlora.compiler.driver import compile_artifact
from privlora.compiler.pipeline import DEFAULT_PASSES

SECONDS = r" in \d+\.\d s"


def expected_phases(tiny_build, artifact) -> list[str]:
    """The phase lines' patterns, in order, for the artifact's own counts."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    segments, rounds = len(manifest["segments"]), len(manifest["rounds"])
    names = re.escape(f"{tiny_build.base.name} + {tiny_build.adapter.name}")
    return [f"compile: loaded {names}", f"compile: traced and ran {len(DEFAULT_PASSES)} passes",
            "compile: recorded each segment's arguments on the sample steps",
            f"compile: lowered {segments} public segments to ONNX",
            f"compile: lowered {rounds} private rounds to plain", "compile: wrote the bundles and manifest"]


def screen(drawn: str) -> list[str]:
    """The lines a terminal shows once everything drawn is done: each line's last redraw."""
    assert drawn.endswith("\n"), repr(drawn)
    return [line.rpartition("\r")[2].removesuffix("\x1b[K") for line in drawn.split("\n")[:-1]]


def test_compile_tells_each_phase_on_a_line_of_a_log(tiny_build, tmp_path, capsys):
    output = tmp_path / "artifact"
    assert main(["compile", "--base", str(tiny_build.base), "--adapter", str(tiny_build.adapter), "-o", str(output),
                 "--backend", "plain"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\x1b" not in captured.err
    lines = captured.err.splitlines()
    patterns = expected_phases(tiny_build, output)
    assert len(lines) == len(patterns), captured.err
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern + SECONDS, line), (pattern, line)
    assert re.fullmatch(rf"wrote {re.escape(str(output))}{SECONDS}: .*\n", captured.out)  # the summary stays on stdout


def test_a_quiet_compile_prints_nothing(tiny_build, tmp_path, capsys):
    report = compile_artifact(str(tiny_build.base), tiny_build.adapter, tmp_path / "artifact", backend="plain",
                              quiet=True)
    assert (report.artifact / "manifest.json").is_file()
    assert capsys.readouterr() == ("", "")


def test_a_terminal_sees_each_phase_drawn_then_ended(tiny_build, tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    output = compile_artifact(str(tiny_build.base), tiny_build.adapter, tmp_path / "artifact", backend="plain").artifact
    drawn = terminal.getvalue()
    patterns = expected_phases(tiny_build, output)
    shown = screen(drawn)
    assert len(shown) == len(patterns), drawn
    for line, pattern in zip(shown, patterns):
        assert re.fullmatch(pattern + SECONDS, line), (pattern, line)
    segments = len(json.loads((output / "manifest.json").read_text())["segments"])
    # While they ran: each phase drawn when it started, the passes and segments counted in place.
    assert f"\rcompile: loading {tiny_build.base.name} + {tiny_build.adapter.name} ...\x1b[K" in drawn
    assert re.search(rf"\rcompile: tracing and running {len(DEFAULT_PASSES)} passes: "
                     rf"{len(DEFAULT_PASSES)}/{len(DEFAULT_PASSES)} passes \[", drawn), drawn
    assert re.search(rf"\rcompile: lowering {segments} public segments to ONNX: {segments}/{segments} segments \[",
                     drawn), drawn
