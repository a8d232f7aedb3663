"""Install roles: a client-only and a server-only venv, built with ``pip install '.[client]'`` and
``'.[server]'`` from the pinned lock, carry no torch, transformers, peft or Concrete. Each given
only its own bundle of the artifact, as deployed, they generate the same tokens over real HTTP on
127.0.0.1 as the full environment and the plaintext fine-tuned model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from privlora.core.artifact import MANIFEST
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.client.generation import GenerationConfig, generate
from privlora.client.tokenizer import load_client_tokenizer

REPO = Path(__file__).resolve().parents[2]
FULL_VENV = Path(sys.prefix)
HEAVY = ("torch", "transformers", "peft", "concrete")  # what only the compile extra may bring
PROMPT = "What are the clinic's opening hours?"
NEW_TOKENS = 6
INSTALL_TIMEOUT_S = 900  # a cold pip cache downloads about 100 MB per venv
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class RoleVenv:
    """One role's venv and how long it took to create and install (printed next to its size)."""

    path: Path
    install_seconds: float

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name


def run(command: list[str | Path], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure shows its output instead of a bare exit status."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)
    shown = " ".join(map(str, command))
    assert result.returncode == 0, f"{shown} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def pip_env() -> dict[str, str]:
    """The caller's pip settings (index, cache), without the upgrade notice."""
    return {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def copy_sources(destination: Path) -> Path:
    """The files the wheel is built from, copied so that the build writes nothing into the working tree."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "privlora", destination / "privlora", ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def build_wheel(root: Path) -> Path:
    """privlora's wheel, so that each role venv gets a non-editable install of this tree."""
    wheels = root / "wheels"
    sources = copy_sources(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, sources],
        timeout=INSTALL_TIMEOUT_S, env=pip_env())
    (wheel,) = wheels.glob("privlora-*.whl")
    return wheel


def install_role(wheel: Path, role: str, venv: Path) -> RoleVenv:
    """A fresh venv with the wheel and the role's extra, pinned by requirements.lock, timed."""
    start = time.perf_counter()
    run([sys.executable, "-m", "venv", venv], timeout=RUN_TIMEOUT_S)
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-c", REPO / "requirements.lock",
         f"{wheel}[{role}]"], timeout=INSTALL_TIMEOUT_S, env=pip_env())
    return RoleVenv(venv, time.perf_counter() - start)


@pytest.fixture(scope="module")
def role_venvs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RoleVenv]]:
    """The client and server venvs, removed afterwards (about 400 MB that pytest would keep)."""
    root = tmp_path_factory.mktemp("roles")
    wheel = build_wheel(root)
    yield {role: install_role(wheel, role, root / role) for role in ("client", "server")}
    shutil.rmtree(root)


def size_mb(path: Path) -> int:
    """Disk use of a directory in MB, as ``du`` measures it."""
    return int(run(["du", "-sk", path], timeout=120).stdout.split()[0]) // 1024


def installed(venv: RoleVenv) -> set[str]:
    """Names of the distributions installed in a venv, lower case."""
    listing = run([venv.bin("python"), "-m", "pip", "list", "--format", "json"], timeout=RUN_TIMEOUT_S, env=pip_env())
    return {entry["name"].lower() for entry in json.loads(listing.stdout)}


def importable(venv: RoleVenv, modules: tuple[str, ...]) -> list[str]:
    """Which of the top-level modules the venv's interpreter finds, whatever installed them."""
    code = f"import importlib.util as u, json; print(json.dumps([m for m in {modules!r} if u.find_spec(m)]))"
    return json.loads(run([venv.bin("python"), "-c", code], timeout=RUN_TIMEOUT_S, cwd=venv.path).stdout)


def test_role_venvs_carry_no_torch_transformers_peft_or_concrete(role_venvs, capsys):
    with capsys.disabled():
        print(f"\nfull environment ({FULL_VENV}): {size_mb(FULL_VENV)} MB")
        for role, venv in role_venvs.items():
            print(f"{role} venv ('.[{role}]'): {size_mb(venv.path)} MB, installed in {venv.install_seconds:.0f} s")
    for role, venv in role_venvs.items():
        names = installed(venv)
        assert "privlora" in names, role
        assert sorted(n for n in names if n.startswith(HEAVY)) == [], role
        assert importable(venv, HEAVY) == [], role
    assert "onnxruntime" in installed(role_venvs["client"]) and "fastapi" in installed(role_venvs["server"])


def deployed(artifact: Path, bundle: str, destination: Path) -> Path:
    """What one machine receives: the manifest and its own bundle (the client never gets ``server/``)."""
    destination.mkdir()
    shutil.copy2(artifact / MANIFEST, destination / MANIFEST)
    shutil.copytree(artifact / bundle, destination / bundle)
    return destination


def free_port() -> int:
    """A loopback port that was free a moment ago, for the server subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(venv: RoleVenv, artifact: Path, port: int, work: Path) -> subprocess.Popen:
    """``privlora serve`` from the venv, its output in work/server.log, its cache in work."""
    work.mkdir()
    with (work / "server.log").open("w") as log:
        return subprocess.Popen([str(venv.bin("privlora")), "serve", str(artifact), "--port", str(port),
                                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, "PRIVLORA_CACHE_DIR": str(work / "cache")})


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Poll /v1/health until the server answers; fail at once with its log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited {server.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not answer /v1/health in {timeout} s:\n{log.read_text()}")


def stop(server: subprocess.Popen) -> None:
    """Terminate the server, killing it if it does not exit, so that no test leaves it running."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def generated_tokens(privlora: Path, artifact: Path, work: Path, *server: str) -> list[int]:
    """The ids ``privlora generate --raw`` streams for PROMPT, greedy, read from its --stats-json."""
    work.mkdir()
    run([privlora, "generate", artifact, *server, "--raw", "--prompt", PROMPT, "--quiet", "--no-key-cache",
         "--max-new-tokens", str(NEW_TOKENS), "--stats-json", work / "stats.json"],
        timeout=RUN_TIMEOUT_S, cwd=work, env={**os.environ, "PRIVLORA_CACHE_DIR": str(work / "cache")})
    return json.loads((work / "stats.json").read_text())["tokens"]


def plaintext_tokens(base: Path, adapter: Path) -> list[int]:
    """The fine-tuned model's greedy ids for PROMPT, encoded as ``privlora generate --raw`` does."""
    tokenizer = load_client_tokenizer(base)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(tokenizer.eos_token_id,))
    prompt = tokenizer.encode(PROMPT, add_special_tokens=True)
    return list(generate(TorchStep(load_model(base, adapter).model), prompt, config))


def test_client_and_server_venvs_generate_the_full_environments_tokens(role_venvs, tiny_build, tmp_path):
    artifact = tiny_build.artifact("ckks")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_bundle = deployed(artifact, "server", tmp_path / "server-machine")
    client_bundle = deployed(artifact, "client", tmp_path / "client-machine")
    server = start_server(role_venvs["server"], server_bundle, port, tmp_path / "server-run")
    try:
        wait_for_health(url, server, tmp_path / "server-run" / "server.log")
        split = generated_tokens(role_venvs["client"].bin("privlora"), client_bundle, tmp_path / "split-run",
                                 "--server", url)
    finally:
        stop(server)
    full = generated_tokens(FULL_VENV / "bin" / "privlora", artifact, tmp_path / "full-run")
    assert split == full == plaintext_tokens(tiny_build.base, tiny_build.adapter)


def test_each_role_inspects_its_own_copy_and_names_the_missing_role(role_venvs, tiny_build, tmp_path):
    """``inspect`` verifies the bundle a deployed copy holds; a command of another role is one line
    that names the extra to install, not a traceback."""
    client_bundle = deployed(tiny_build.artifact("ckks"), "client", tmp_path / "client-machine")
    report = run([role_venvs["client"].bin("privlora"), "inspect", client_bundle], RUN_TIMEOUT_S).stdout
    assert "client" in report and "(verified)" in report and "not in this copy" in report
    wrong = subprocess.run([str(role_venvs["client"].bin("privlora")), "serve", str(client_bundle)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "pip install 'privlora[server]'" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
