"""``make demo`` / ``privlora demo``: held-out questions about the fictional clinic, answered by
the base model, by the fine-tuned model through secure generation (prompt encrypted, adapter on
the server), and by the fine-tuned model in plaintext for comparison.

The artifact is compiled once and cached (``$PRIVLORA_CACHE_DIR/artifacts``); the server runs in
process on the server bundle, the client on the client bundle, with real encryption.
"""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path

import privlora
from privlora.core.artifact import ArtifactError, load_bundle
from privlora.compiler.driver import compile_artifact
from privlora.tools.evaluate import ask
from privlora.files import file_sha256
from privlora.paths import cache_root
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.tools.qa import load_qa, states_fact
from privlora.client.secure import SecureClient
from privlora.client.timings import render_timings
from privlora.local import local_transport
from privlora.tools.machine import report_machine

ANSWER_TOKENS = 32
PADS_PER_QUESTION = 96  # a question of the demo set and its answer fit in it


def _show(label: str, answer: str, keyword: str, seconds: float, tokens: int | None = None) -> None:
    mark = "states the fact" if states_fact(answer, keyword) else "does not state the fact"
    rate = f", {tokens / seconds:.2f} tokens/s" if tokens else ""
    print(f"  {label} ({seconds:.1f} s{rate}, {mark}):")
    print(textwrap.indent(textwrap.fill(answer or "(empty)", 92), "    "))


def demo_artifact(base: str, adapter: Path, backend: str) -> Path:
    """The demo's compiled artifact, compiled on first use and cached by its inputs."""
    identity = hashlib.sha256(f"{privlora.__version__}|{base}|{backend}".encode())
    for path in sorted(p for p in adapter.iterdir() if p.is_file()):
        identity.update(f"{path.name}:{file_sha256(path)}".encode())
    artifact = cache_root() / "artifacts" / f"demo-{backend}-{identity.hexdigest()[:16]}"
    try:
        load_bundle(artifact, "client")
        load_bundle(artifact, "server")
        print(f"artifact:   {artifact} (cached)")
    except ArtifactError:
        print(f"Compiling base + adapter with the {backend} backend ...")
        report = compile_artifact(base, adapter, artifact, backend=backend, force=True)
        print(f"artifact:   {artifact} (compiled in {report.seconds:.0f} s: {report.rounds} private rounds per token)")
    return artifact


def _make_pads(backend: str, client: SecureClient, questions: int) -> float:
    """Pads for every question's prompt and answer, made before the first one (as ``chat`` makes
    them while the user types); the seconds it took, shown apart (0 for a per-query backend)."""
    made = client.prepare(questions * PADS_PER_QUESTION)
    if made.rows:
        print(f"pads:       {made.rows:g} rows per group for {backend}, made ahead in {made.seconds:.1f} s "
              f"({(made.bytes_up + made.bytes_down) / 1e6:.0f} MB), before the first question")
    return made.seconds


def run_demo(base: str, adapter: Path, questions: int, backends: tuple[str, ...] = ("pads",)) -> None:
    """Print base, secure fine-tuned (one answer per backend, side by side) and plaintext
    fine-tuned answers to held-out questions, with where the secure time went."""
    report_machine()
    print("Loading the base model and the demo adapter ...")
    plain = load_model(base)
    tuned = load_model(base, adapter)
    print(f"base model: {plain.base_path}")
    print(f"adapter:    {adapter} (rank {tuned.adapter.rank}, {len(tuned.lora_sites)} LoRA sites)")
    clients = {}
    for backend in backends:
        artifact = demo_artifact(base, adapter, backend)
        clients[backend] = SecureClient(artifact, local_transport(artifact))
    print(f"secure:     backends {', '.join(backends)}, in-process server on the server bundle, keys cached per artifact")
    ahead = {backend: _make_pads(backend, client, questions) for backend, client in clients.items()}
    print()
    totals = {backend: [0, 0.0] for backend in backends}  # tokens, seconds
    plain_seconds = 0.0
    try:
        for number, pair in enumerate(load_qa(split="heldout")[:questions], start=1):
            print(f"Q{number}: {pair.question}")
            print(f"  expected: {pair.answer}")
            start = time.perf_counter()
            _show("base model (plaintext)", ask(TorchStep(plain.model), plain.tokenizer, pair.question, ANSWER_TOKENS),
                  pair.keyword, time.perf_counter() - start)
            start = time.perf_counter()
            reference = ask(TorchStep(tuned.model), tuned.tokenizer, pair.question, ANSWER_TOKENS)
            plain_seconds += time.perf_counter() - start
            _show("fine-tuned, plaintext", reference, pair.keyword, time.perf_counter() - start)
            for backend, client in clients.items():
                client.steps.clear()
                start = time.perf_counter()
                secure = ask(client, tuned.tokenizer, pair.question, ANSWER_TOKENS)
                seconds = time.perf_counter() - start
                totals[backend][0] += len(client.steps)
                totals[backend][1] += seconds
                _show(f"fine-tuned, secure with {backend} (prompt hidden, adapter on the server)", secure,
                      pair.keyword, seconds, len(client.steps))
                print(f"  {backend}: secure answer {'identical to' if secure == reference else 'DIFFERS from'} "
                      "the plaintext answer; where the time went:")
                print(textwrap.indent(render_timings(client.steps), "    "))
            print()
    finally:
        for client in clients.values():
            client.close()
    for backend, (tokens, seconds) in totals.items():
        made = f"; pads made ahead: {ahead[backend]:.1f} s" if ahead[backend] else ""
        print(f"secure generation with {backend}: {tokens} tokens in {seconds:.1f} s "
              f"({tokens / seconds:.2f} tokens/s, prefill included{made})")
    print(f"plaintext fine-tuned: {plain_seconds:.1f} s for the same questions")
