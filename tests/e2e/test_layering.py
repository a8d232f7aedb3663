"""The architecture's layering, checked on the source: the user's machine (client) and the
adapter owner's (server) rest only on what both share and never import each other, the runtime
runs without the compiler's stack, no library module imports the CLI, and no import cycle exists.

Rooms, lowest first (a module may import its own room and the ones its rule names):
  base     privlora (package), errors, files, paths, progress
  core     the artifact layout, the shared data types, the wire (routes, frames, refusals)
  backends each backend behind the contract
  client   the user's machine: secure client, transports, generation, assistant, chat, gateway
  server   the adapter owner's machine: hosting, private server, sessions, accounts, http, ray
  local    the in-process pairing of a client and a server (the one module that imports both)
  models   architectures, checkpoints, adapters
  compiler the compiler and its passes
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
LAYERS = ["base", "core", "backends", "client", "server", "local", "models", "compiler", "tools", "cli"]
# what each room may import besides itself
MAY_IMPORT = {
    "base": set(),
    "core": {"base"},
    "backends": {"base", "core"},
    "client": {"base", "core", "backends"},
    "server": {"base", "core", "backends"},
    "local": {"base", "core", "backends", "client", "server"},
    "models": {"base", "core"},  # models sit beside the runtime, not above it
    "compiler": {"base", "core", "backends", "client", "models"},  # the client's ONNX segments check a lowering
    "tools": {"base", "core", "backends", "client", "server", "local", "models", "compiler"},
    "cli": set(LAYERS) - {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"errors", "files", "paths", "progress"}:
        return "base"
    if parts[1] in {"core", "backends", "client", "server", "local", "models", "compiler", "tools", "cli"}:
        return parts[1]
    raise AssertionError(f"{module} is in no room: add it to one (and to the layout in docs/architecture.md)")


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
    mine, theirs = layer(source), layer(target)
    return theirs == mine or theirs in MAY_IMPORT[mine]


def test_every_import_respects_the_layers():
    wrong = sorted(f"{source} imports {target}" for source, path in SOURCES.items()
                   for target in imports(path, top_level_only=False) if not allowed(source, target))
    assert wrong == []


def test_no_library_module_imports_the_cli():
    assert [source for source, path in SOURCES.items()
            if layer(source) != "cli" and any(layer(t) == "cli" for t in imports(path, top_level_only=False))] == []


def test_the_user_side_commands_import_no_server_module():
    """`generate`, `chat`, `gateway`, `models` and `inspect` run on the user's machine (the client
    and gateway install roles): they reach a server's code only through privlora.local, for the
    in-process default."""
    from privlora.cli.main import INSTALL_ROLES

    user_side = [f"privlora.cli.{command}" for command, role in INSTALL_ROLES.items() if role in {"client", "gateway"}]
    assert {"privlora.cli.gateway", "privlora.cli.generate", "privlora.cli.models"} <= set(user_side)
    wrong = sorted(f"{source} imports {target}" for source in [*user_side, "privlora.cli.options"]
                   for target in imports(SOURCES[source], top_level_only=False) if layer(target) == "server")
    assert wrong == []


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
    assert not allowed("privlora.client.secure", "privlora.server.private")
    assert not allowed("privlora.server.http", "privlora.client.transports")
    assert not allowed("privlora.client.secure", "privlora.compiler.driver")
    assert not allowed("privlora.backends.ckks", "privlora.models.architectures.llama")
    assert not allowed("privlora.core.wire", "privlora.backends.base")
    assert allowed("privlora.local", "privlora.server.hosting") and allowed("privlora.local", "privlora.client.secure")
    assert "privlora.compiler.driver" in imports(SOURCES["privlora.tools.demo"], top_level_only=True)


def test_folders_import_no_folder_above_them_and_form_no_cycle():
    """At folder level the import graph is a ladder: no upward arrow, so no cycle between rooms."""
    arrows = {(layer(source), layer(target)) for source, path in SOURCES.items()
              for target in imports(path, top_level_only=False) if target in SOURCES}
    upward = {(a, b) for a, b in arrows if a != b and LAYERS.index(b) > LAYERS.index(a)}
    assert upward == set()
    assert ("client", "server") not in arrows and ("server", "client") not in arrows


HEAVY = ("torch", "transformers", "peft", "concrete.ml", "concrete")


def test_client_and_server_import_no_compiler_stack(tmp_path):
    """A fresh interpreter imports everything a client or a server runs: none of the compile-side
    libraries may end up in sys.modules."""
    modules = sorted(m for m in SOURCES if layer(m) in {"core", "client", "server", "local"} and m != "privlora.server.ray")
    modules += ["privlora.tools.loadtest", "privlora.backends.bfv", "privlora.backends.ckks", "privlora.backends.plain",
                "privlora.backends.reference"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'torch', 'transformers', 'peft'}} "
            f"or m.startswith('concrete')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    control = subprocess.run([sys.executable, "-c", "import sys, privlora.compiler.driver; print('torch' in sys.modules)"],
                             capture_output=True, text=True, cwd=tmp_path, check=True)
    assert control.stdout.strip() == "True"  # the check would see torch if it were there
