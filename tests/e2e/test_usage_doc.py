"""docs/usage.md kept true: its commands run in order, as a reader would type them, against the
real model (SmolLM2 and the demo adapter, compiled, served, with accounts, TLS, the gateway and
the chat), and each prints what the page shows, up to the figures. How the page is read and
compared: tests/support/usage_doc.py."""

from __future__ import annotations

from support.usage_doc import Command, check, commands, missing, run_page

PAGE = """Intro.

```console
$ privlora compile -o clinic   # a comment
wrote clinic in 17.0 s: 60 LoRA sites
```

<!-- not run: needs two builds -->
```console
$ privlora serve a b
```

```console
$ privlora serve clinic --port 8766 &
$ curl -s -d '{
    "a": 1}' http://x \\
      --fail
{"object": ...}
```
"""


def test_the_page_is_read_as_a_reader_types_it():
    found = commands(PAGE)
    assert [(c.text, c.background, c.shown) for c in found] == [
        ("privlora compile -o clinic   # a comment", False, ["wrote clinic in 17.0 s: 60 LoRA sites"]),
        ("privlora serve clinic --port 8766", True, []),
        ("curl -s -d '{\n    \"a\": 1}' http://x  --fail", False, ['{"object": ...}'])]


def test_figures_may_differ_and_words_may_not():
    printed = "compile: traced in 0.3 s\nwrote clinic in 61.2 s: 60 LoRA sites\nclient bundle 655.4 MB, 2 files"
    assert missing(["wrote clinic in 17.0 s: 60 LoRA sites", "client bundle 2.1 GB, 2 files"], printed) is None
    assert missing(["wrote clinic in 17.0 s: 60 LoRA sites"], printed.replace("LoRA", "lora")) is not None
    assert missing(["client bundle 655.4 MB, 2 files", "wrote clinic in 17.0 s: 60 LoRA sites"], printed) \
        is not None  # in order
    assert missing(['{"object": "list", ...}'], '{"object": "list", "data": [1, 2]}') is None
    failed = Command("privlora generate", ["privlora: error: no such file"], (0, 1), output="hello\n", returncode=0)
    assert "exited 0" in check(failed)  # shown failing, ran fine: the page is wrong


def test_every_command_of_the_usage_page_prints_what_it_shows(tmp_path):
    ran = run_page(tmp_path)
    assert len(ran) >= 20 and any(c.text.startswith("privlora gateway") for c in ran)
    assert [problem for problem in map(check, ran) if problem] == []
