"""Packaging: import has no side effects, the console command and every subcommand have help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from privlora.cli import build_parser

PRIVLORA = Path(sys.executable).parent / "privlora"


def test_import_has_no_side_effects(tmp_path):
    env = {**os.environ, "PRIVLORA_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    code = "import sys, privlora, privlora.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert result.stdout.strip() == "[]" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # nothing written: no cache, no logs


def test_help_lists_the_commands():
    result = subprocess.run([str(PRIVLORA), "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in result.stdout


COMMANDS = ["prepare", "finetune", "evaluate", "compile", "inspect", "serve", "models", "generate", "loadtest",
            "attack", "bench", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: privlora " + command in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path):
    result = subprocess.run([str(PRIVLORA), "prepare", "--base", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("privlora: error:") and "Traceback" not in result.stderr


def test_a_reader_that_leaves_early_gets_no_traceback(tiny_build):
    """`privlora inspect ART --json | head -c 1`: the pipe closes under the writer."""
    reader = subprocess.Popen([sys.executable, "-m", "privlora.cli", "inspect", str(tiny_build.artifact("bfv")), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.read(1) == b"{"
    reader.stdout.close()
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=60) in (0, 141) and "Traceback" not in stderr and "Error" not in stderr, stderr
