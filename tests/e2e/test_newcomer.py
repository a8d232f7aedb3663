"""The newcomer's path (issue 15): one-line errors with the right exit codes, the context length
checked before any round, bases without a chat template, ``--raw`` and the tokenizer's BOS,
compiles that clean up after themselves, ``inspect`` naming a damaged file, help without empty
defaults, and progress output that suits both a terminal and a log.

Everything runs on the session's tiny Llama (``tiny_build``) with the plain backend; a real
process is started only where the process itself matters (exit codes, stderr that is a pipe).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from privlora.cli import build_parser, main
from privlora.client.tokenizer import load_client_tokenizer

CONTEXT = 256  # TINY_LLAMA's max_position_embeddings
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``privlora ARGV`` in this process: exit code, stdout, stderr (argparse exits become codes)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real entry point in its own process, stdout and stderr to pipes."""
    return subprocess.run([sys.executable, "-m", "privlora.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    """The single line on stderr; fails when there is anything else (a traceback, a usage block)."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert stderr.endswith("\n")
    return lines[0]


def edit_tokenizer(directory: Path, edit_config=None, edit_backend=None) -> Path:
    """Edit the tokenizer saved in ``directory``: its config (a dict) and its ``tokenizers`` backend."""
    if edit_config is not None:
        path = directory / "tokenizer_config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config, indent=2))
    if edit_backend is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        edit_backend(backend)
        backend.save(str(directory / "tokenizer.json"))
    return directory


def base_variant(tiny_build, directory: Path, edit_config=None, edit_backend=None) -> Path:
    """A copy of the tiny base checkpoint with its tokenizer edited."""
    return edit_tokenizer(shutil.copytree(tiny_build.base, directory), edit_config, edit_backend)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def plain(tiny_build) -> Path:
    return tiny_build.artifact("plain")


@pytest.fixture
def spy_rounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every private message an in-process generation sends to its server."""
    from privlora.local import InProcessTransport

    calls: list[tuple] = []
    original = InProcessTransport.evaluate

    def evaluate(self, session, round_name, index, message, payload):
        calls.append((round_name, index, message))
        return original(self, session, round_name, index, message, payload)

    monkeypatch.setattr(InProcessTransport, "evaluate", evaluate)
    return calls


# 1. One-line errors, exit 2 for usage and 1 for runtime failures.

def test_empty_prompt_is_one_line_usage_error(plain, capsys):
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", " ")
    assert (code, out) == (2, "")
    assert one_line(err) == "privlora: error: the prompt is empty"


@pytest.mark.parametrize("option, value, message", [
    ("--max-new-tokens", "0", "must be in [1, 1024], got 0"),
    ("--max-new-tokens", "1025", "must be in [1, 1024], got 1025"),
    ("--max-new-tokens", "abc", "expected an integer, got 'abc'"),
    ("--top-p", "0", "must be in (0, 1], got 0"),
    ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
    ("--temperature", "-1", "must be at least 0, got -1"),
])
def test_out_of_bounds_options_are_one_line_usage_errors(plain, capsys, option, value, message):
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", "hello", option, value)
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith(f"privlora generate: error: argument {option}: {message}"), line


def test_real_entry_point_exit_codes(plain):
    empty = run_process("generate", str(plain), "--prompt", " ")
    assert (empty.returncode, empty.stdout, empty.stderr) == (2, "", "privlora: error: the prompt is empty\n")

    bound = run_process("generate", str(plain), "--prompt", "hello", "--top-p", "0")
    assert (bound.returncode, bound.stdout) == (2, "")
    assert one_line(bound.stderr).startswith("privlora generate: error: argument --top-p: must be in (0, 1], got 0")

    unreachable = run_process("generate", str(plain), "--prompt", "hello", "--server", "http://127.0.0.1:9",
                              "--max-new-tokens", "2", "--no-key-cache")
    assert (unreachable.returncode, unreachable.stdout) == (1, "")
    line = one_line(unreachable.stderr)
    assert line.startswith("privlora: error: cannot ") and "http://127.0.0.1:9" in line, line


def test_unreachable_server_in_process_is_one_line_runtime_error(plain, capsys):
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", "hello", "--server", "http://127.0.0.1:9",
                             "--transport", "http", "--no-key-cache")
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith("privlora: error: cannot reach the privlora server at http://127.0.0.1:9"), line


# 2. The prompt and --max-new-tokens against the model's context, before any round.

def test_check_context_boundary():
    from privlora.errors import UsageError
    from privlora.client.generation import ContextLengthError, check_context

    check_context(CONTEXT - 10, 10, CONTEXT)  # exactly the context: accepted
    check_context(1, CONTEXT - 1, CONTEXT)
    with pytest.raises(ContextLengthError) as refused:
        check_context(CONTEXT - 10, 11, CONTEXT)
    assert isinstance(refused.value, UsageError) and refused.value.exit_code == 2
    assert str(refused.value).startswith(f"a {CONTEXT - 10}-token prompt and up to 11 new tokens exceed the model's "
                                         f"context of {CONTEXT} positions")
    with pytest.raises(ContextLengthError):
        check_context(CONTEXT, 1, CONTEXT)


def test_too_long_prompt_refused_before_any_round(plain, capsys, spy_rounds):
    prompt = "hello " * 75
    tokens = len(load_client_tokenizer(plain / "client" / "tokenizer").encode(prompt, add_special_tokens=True))
    assert tokens > CONTEXT  # the prompt alone does not fit
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", prompt, "--raw", "--no-key-cache")
    assert (code, out) == (2, "")
    line = one_line(err)  # no prefill line, no timing table
    assert line == (f"privlora: error: a {tokens}-token prompt leaves no room for an answer in the model's context "
                    f"of {CONTEXT} positions: shorten the prompt"), line
    assert spy_rounds == []


def test_prompt_that_fits_but_not_with_the_new_tokens(plain, capsys, spy_rounds):
    prompt = "hello " * 10
    tokens = len(load_client_tokenizer(plain / "client" / "tokenizer").encode(prompt, add_special_tokens=True))
    fits = CONTEXT - tokens
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", prompt, "--raw", "--no-key-cache",
                             "--max-new-tokens", str(fits + 1))
    assert (code, out) == (2, "")
    assert f"a {tokens}-token prompt and up to {fits + 1} new tokens exceed the model's context of {CONTEXT} " \
           "positions" in one_line(err)
    assert spy_rounds == []
    # The control: the same prompt with a smaller budget does reach the server.
    code, out, err = run_cli(capsys, "generate", str(plain), "--prompt", prompt, "--raw", "--no-key-cache",
                             "--max-new-tokens", "1", "--quiet")
    assert code == 0 and spy_rounds


# 3. A base model without a chat template.

def test_base_without_chat_template_needs_raw(tiny_build, tmp_path, capsys):
    def drop_template(config):
        del config["chat_template"]

    base = base_variant(tiny_build, tmp_path / "base", edit_config=drop_template)
    assert not (base / "chat_template.jinja").exists()
    artifact = tmp_path / "artifact"
    code, _, err = run_cli(capsys, "compile", "--base", str(base), "--adapter", str(tiny_build.adapter),
                           "-o", str(artifact), "--backend", "plain")
    assert code == 0, err
    assert load_client_tokenizer(artifact / "client" / "tokenizer").chat_template is None

    code, out, err = run_cli(capsys, "generate", str(artifact), "--prompt", "hello", "--no-key-cache")
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.startswith("privlora: error: ") and "no chat template" in line and "pass --raw" in line, line

    code, out, err = run_cli(capsys, "generate", str(artifact), "--prompt", "hello", "--raw", "--no-key-cache",
                             "--max-new-tokens", "3")
    assert code == 0, err
    assert "Traceback" not in err and out.endswith("\n")


# 4. --raw adds the BOS exactly when the tokenizer does, as transformers does.

TEXTS = ["Hello world, how are you?", "When does the clinic open?\nAt 7:40 am."]


def assert_same_ids(directory: Path, bos: int | None) -> None:
    import transformers

    ours, theirs = load_client_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text).input_ids
        bare = ours.encode(text, add_special_tokens=False)
        assert ids == (bare if bos is None else [bos, *bare])


def with_bos(config):
    config["bos_token"] = "<|im_start|>"


def bos_post_processor(backend):
    from tokenizers.processors import TemplateProcessing

    bos = "<|im_start|>"
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, backend.token_to_id(bos))])


def llama_class(add_bos):
    def edit(config):
        with_bos(config)
        config["tokenizer_class"] = "LlamaTokenizerFast"
        if add_bos is not None:
            config["add_bos_token"] = add_bos
    return edit


def test_tiny_tokenizer_adds_no_bos(tiny_build):
    assert_same_ids(tiny_build.base, bos=None)


@pytest.mark.parametrize("name, edit_config, edit_backend, adds_bos", [
    ("post-processor", with_bos, bos_post_processor, True),
    ("llama-default", llama_class(None), None, True),
    ("llama-add-bos", llama_class(True), None, True),
    ("llama-no-bos", llama_class(False), bos_post_processor, False),  # the class rebuilds the saved one away
])
def test_bos_follows_the_tokenizer(tiny_build, tmp_path, name, edit_config, edit_backend, adds_bos):
    directory = tmp_path / name
    directory.mkdir()
    for file in TOKENIZER_FILES:
        shutil.copy(tiny_build.base / file, directory / file)
    edit_tokenizer(directory, edit_config, edit_backend)
    bos = load_client_tokenizer(directory).bos_token_id
    assert bos is not None
    assert_same_ids(directory, bos if adds_bos else None)


def test_smollm2_tokenizer_matches_transformers():
    from privlora.models import smollm2

    directory = smollm2.converted_dir()
    if not (directory / smollm2.COMPLETE_MARKER).is_file():
        pytest.skip("the embedded SmolLM2 is not converted yet (about 30 s): run 'privlora prepare'")
    import transformers

    ours, theirs = load_client_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids


def test_generate_raw_sends_the_bos_and_chat_does_not_add_one(tiny_build, tmp_path, capsys):
    import transformers

    base = base_variant(tiny_build, tmp_path / "base", edit_config=with_bos, edit_backend=bos_post_processor)
    artifact = tmp_path / "artifact"
    code, _, err = run_cli(capsys, "compile", "--base", str(base), "--adapter", str(tiny_build.adapter),
                           "-o", str(artifact), "--backend", "plain")
    assert code == 0, err
    reference = transformers.AutoTokenizer.from_pretrained(str(base))
    text = TEXTS[0]
    expected = {
        "raw": len(reference(text).input_ids),
        "chat": len(reference.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)),
    }
    assert expected["raw"] == len(reference(text, add_special_tokens=False).input_ids) + 1
    for mode, tokens in expected.items():
        stats = tmp_path / f"{mode}.json"
        code, _, err = run_cli(capsys, "generate", str(artifact), "--prompt", text, "--quiet", "--no-key-cache",
                               "--max-new-tokens", "1", "--stats-json", str(stats), *(["--raw"] if mode == "raw" else []))
        assert code == 0, err
        assert json.loads(stats.read_text())["prompt_tokens"] == tokens, mode


# 5. A failed or interrupted compile removes what it wrote.

def broken_adapters(tiny_build, root: Path) -> dict[str, Path]:
    missing_target = shutil.copytree(tiny_build.adapter, root / "missing-target")
    config = json.loads((missing_target / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (missing_target / "adapter_config.json").write_text(json.dumps(config))
    corrupt = shutil.copytree(tiny_build.adapter, root / "corrupt-weights")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return {"missing target": missing_target, "corrupt weights": corrupt}


def compile_argv(tiny_build, adapter: Path, output: Path) -> list[str]:
    return ["compile", "--base", str(tiny_build.base), "--adapter", str(adapter), "-o", str(output),
            "--backend", "plain"]


def test_failed_compile_removes_its_output(tiny_build, tmp_path, capsys):
    for name, adapter in broken_adapters(tiny_build, tmp_path).items():
        fresh, empty = tmp_path / f"fresh-{name}", tmp_path / f"empty-{name}"
        empty.mkdir()
        for output in (fresh, empty):
            code, out, err = run_cli(capsys, *compile_argv(tiny_build, adapter, output))
            assert code != 0 and out == "", name
            line = one_line(err)
            assert line.startswith("privlora: error: ") and str(adapter) in line, line
        assert not fresh.exists(), name
        assert empty.is_dir() and list(empty.iterdir()) == [], name
        for output in (fresh, empty):  # a retry needs no --force
            code, out, err = run_cli(capsys, *compile_argv(tiny_build, tiny_build.adapter, output))
            assert code == 0, err
            assert out.startswith(f"wrote {output} ") and (output / "manifest.json").is_file()


def test_interrupted_compile_leaves_nothing(tiny_build, tmp_path, capsys, monkeypatch):
    from privlora.compiler import driver

    real = driver.lower_segment
    lowered: list[Path] = []

    def interrupt_after_one(module, name, arguments, path):
        if lowered:
            raise KeyboardInterrupt
        lowered.append(path)
        return real(module, name, arguments, path)

    monkeypatch.setattr(driver, "lower_segment", interrupt_after_one)
    fresh, empty = tmp_path / "fresh", tmp_path / "empty"
    empty.mkdir()
    for output in (fresh, empty):
        lowered.clear()
        code, out, err = run_cli(capsys, *compile_argv(tiny_build, tiny_build.adapter, output))
        assert (code, out) == (130, "")
        assert "privlora: interrupted" in err.splitlines() and "Traceback" not in err
        assert len(lowered) == 1 and str(lowered[0]).startswith(str(output))  # it had written a segment
    assert not fresh.exists()
    assert empty.is_dir() and list(empty.iterdir()) == []
    monkeypatch.setattr(driver, "lower_segment", real)
    code, _, err = run_cli(capsys, *compile_argv(tiny_build, tiny_build.adapter, fresh))
    assert code == 0, err


# 6. inspect names a damaged file.

def test_inspect_names_the_damaged_file(plain, tmp_path, capsys):
    intact = shutil.copytree(plain, tmp_path / "intact")
    code, out, err = run_cli(capsys, "inspect", str(intact))
    assert (code, err) == (0, "") and "(verified)" in out
    manifest = json.loads((plain / "manifest.json").read_text())
    segment = manifest["segments"][1]["file"]
    server = next(name for name, entry in manifest["files"].items()
                  if entry["bundle"] == "server" and name.endswith(".safetensors"))
    for relative in (segment, server):
        damaged = shutil.copytree(plain, tmp_path / relative.replace("/", "_"))
        flip_byte(damaged / relative)
        code, out, err = run_cli(capsys, "inspect", str(damaged))
        assert code != 0 and out == ""
        line = one_line(err)
        assert line.startswith("privlora: error: ") and relative in line and str(damaged) in line, line


# 7. Help without empty defaults.

COMMANDS = ["prepare", "finetune", "evaluate", "compile", "inspect", "serve", "generate", "loadtest", "attack",
            "bench", "demo", "accounts"]  # tests/e2e/test_package.py's list, and accounts

def all_parsers() -> list[argparse.ArgumentParser]:
    found, todo = [], [build_parser()]
    while todo:
        parser = todo.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


def test_help_shows_no_empty_or_required_defaults():
    parsers = all_parsers()
    names = {parser.prog for parser in parsers}
    assert {f"privlora {command}" for command in COMMANDS} <= names, names
    assert {"privlora accounts create", "privlora attack extract"} <= names
    for parser in parsers:
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text, \
            parser.prog
        flat = " ".join(text.split())
        for action in parser._actions:
            if action.required and action.help and action.option_strings:
                described = " ".join(action.help.split())
                assert described in flat and described + " (default:" not in flat, (parser.prog, action.dest)
    generate = " ".join(next(p for p in parsers if p.prog == "privlora generate").format_help().split())
    assert "--prompt PROMPT the user's message --server" in generate  # required: no default
    assert "(default: 256, or the rest of the model's context if less; at most 1024)" in generate  # said once


# 8. Progress: redrawn on a terminal, one summary line in a log.

def test_compile_progress_to_a_pipe(tiny_build, tmp_path):
    output = tmp_path / "artifact"
    result = run_process(*compile_argv(tiny_build, tiny_build.adapter, output))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    segments = len(json.loads((output / "manifest.json").read_text())["segments"])
    lowered = [line for line in result.stderr.splitlines() if "to ONNX" in line]
    assert len(lowered) == 1, result.stderr
    assert re.fullmatch(rf"compile: lowered {segments} public segments to ONNX in \d+\.\d s", lowered[0]), lowered


def test_generate_progress_to_a_pipe(plain, tmp_path):
    groups = sum(len(r["plls"]) for r in json.loads((plain / "manifest.json").read_text())["rounds"])
    result = run_process("generate", str(plain), "--prompt", "hello", "--max-new-tokens", "2", "--no-key-cache")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    prefill = [line for line in result.stderr.splitlines() if line.startswith("prefill:")]
    assert len(prefill) == 1, result.stderr
    assert re.fullmatch(rf"prefill: {groups}/{groups} private groups in \d+\.\d s", prefill[0]), prefill
    assert result.stderr.startswith(prefill[0] + "\n")  # before the answer's summary and timings


def test_progress_redraws_on_a_terminal():
    from privlora.progress import Progress

    stream = io.StringIO()
    progress = Progress(3, "work", "items", stream=stream, interactive=True)
    for _ in range(3):
        progress.advance()
    drawn = stream.getvalue()
    assert drawn.startswith("\r") and "\n" not in drawn
    assert re.search(r"\rwork: 3/3 items \[\d+:\d\d elapsed, ETA \d+:\d\d\]\x1b\[K$", drawn), repr(drawn)
    progress.close()
    assert stream.getvalue() == drawn + "\n"


def test_progress_in_a_log_writes_one_summary():
    from privlora.progress import Progress

    stream = io.StringIO()  # not a terminal: interactive follows isatty()
    with Progress(3, "work", "items", stream=stream) as progress:
        for _ in range(3):
            progress.advance()
            assert stream.getvalue() == ""
    assert re.fullmatch(r"work: 3/3 items in \d+\.\d s\n", stream.getvalue()), repr(stream.getvalue())


def test_a_failed_phase_ends_its_line_and_tells_no_time():
    from privlora.progress import Phases

    for interactive, left in ((False, ""), (True, "\rjob: working ...\x1b[K\n")):
        stream = io.StringIO()
        with pytest.raises(KeyboardInterrupt):
            with Phases("job", stream, interactive=interactive).phase("working", "worked"):
                raise KeyboardInterrupt
        assert stream.getvalue() == left  # the failure's message, printed next, gets a line of its own
