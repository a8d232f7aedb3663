"""The architecture's layering, checked on the source: the runtime and the backends run without
the compiler's stack, no library module imports the CLI, and no import cycle exists.

Layers, lowest first (a module may import its own layer and the ones below):
  base     privlora (package), errors, files, paths, progress
  core     the artifact layout and the shared data types
  backends each backend behind the contract
  runtime  client, server, transports, generation
  models   architectures, checkpoints, adapters
  compiler the compiler and its passes (one layer: passes are built on the compiler's IR)
  tools    attack, bench, demo, evaluate, finetune, loadtest, qa
  cli      the command line
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import privlora

ROOT = Path(privlora.__file__).parent
LAYERS = ["base", "core", "backends", "runtime", "models", "compiler", "tools", "cli"]
# what each layer may import besides its own and lower layers' modules
EXTRA = {"models": {"base", "core"}}  # models sit beside backends and runtime, not above them


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"errors", "files", "paths", "progress"}:
        return "base"
    if parts[1] in {"core", "backends", "runtime", "models", "cli"}:
        return parts[1]
    if parts[1] in {"compiler", "passes"}:
        return "compiler"
    return "tools"


def imports(path: Path, top_level_only: bool) -> set[str]:
    """privlora modules imported by a file (at import time only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("privlora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("privlora"):
            for alias in node.names:  # `from privlora import backends` names a module
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                    (ROOT.parent / Path(*candidate.split("."))).is_dir()
                found.add(candidate if is_module else node.module)
    return found


SOURCES = {module_name(path): path for path in ROOT.rglob("*.py")}


def allowed(source: str, target: str) -> bool:
    mine, theirs = LAYERS.index(layer(source)), LAYERS.index(layer(target))
    if layer(source) == "models":
        return layer(target) in {"base", "core", "models"}
    if layer(source) in {"core", "backends", "runtime"}:
        return layer(target) in {"base", "core", "backends", "runtime"} and theirs <= mine
    return theirs <= mine


def test_every_import_respects_the_layers():
    wrong = sorted(f"{source} imports {target}" for source, path in SOURCES.items()
                   for target in imports(path, top_level_only=False) if not allowed(source, target))
    assert wrong == []


def test_no_library_module_imports_the_cli():
    assert [source for source, path in SOURCES.items()
            if source != "privlora.cli" and "privlora.cli" in imports(path, top_level_only=False)] == []


def test_no_import_cycle():
    """Depth-first search for a cycle among import-time imports of privlora modules."""
    graph = {source: {t for t in imports(path, top_level_only=True) if t in SOURCES} for source, path in SOURCES.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack + [node, target]
            if target not in state and (cycle := visit(target, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, []) is None


def test_the_layer_rules_can_fail():
    """The checks above see a violation when there is one (their positive control)."""
    assert not allowed("privlora.runtime.client", "privlora.compiler.driver")
    assert not allowed("privlora.backends.ckks", "privlora.models.llama")
    assert "privlora.compiler.driver" in imports(SOURCES["privlora.demo"], top_level_only=True)


HEAVY = ("torch", "transformers", "peft", "concrete.ml", "concrete")


def test_client_and_server_import_no_compiler_stack(tmp_path):
    """A fresh interpreter imports everything a client or a server runs: none of the compile-side
    libraries may end up in sys.modules."""
    modules = ["privlora.runtime.client", "privlora.runtime.server", "privlora.runtime.http",
               "privlora.runtime.transport", "privlora.runtime.generation", "privlora.core.inspection",
               "privlora.runtime.gateway", "privlora.runtime.chat", "privlora.runtime.accounts",
               "privlora.runtime.metrics", "privlora.loadtest", "privlora.backends.bfv", "privlora.backends.ckks", "privlora.backends.plain", "privlora.backends.reference"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'transformers', 'peft'}} "
            f"or m.startswith('concrete')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    control = subprocess.run([sys.executable, "-c", "import sys, privlora.compiler.driver; print('torch' in sys.modules)"],
                             capture_output=True, text=True, cwd=tmp_path, check=True)
    assert control.stdout.strip() == "True"  # the check would see torch if it were there
