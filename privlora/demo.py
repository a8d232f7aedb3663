"""``make demo`` / ``privlora demo``: the base model and the fine-tuned model answer held-out
questions about the fictional clinic.

At this stage both run in plaintext on this machine; the secure runtime (encrypted prompt,
adapter on the server) replaces the fine-tuned path once it lands.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from privlora.evaluate import ask
from privlora.models.loading import load_model
from privlora.qa import load_qa, states_fact


def _show(label: str, answer: str, keyword: str, seconds: float) -> None:
    mark = "states the fact" if states_fact(answer, keyword) else "does not state the fact"
    print(f"  {label} ({seconds:.1f} s, {mark}):")
    print(textwrap.indent(textwrap.fill(answer or "(empty)", 92), "    "))


def run_demo(base: str, adapter: Path, questions: int) -> None:
    """Print base and adapted answers to the first ``questions`` held-out questions."""
    print("Loading the base model and the demo adapter ...")
    plain = load_model(base)
    tuned = load_model(base, adapter)
    print(f"base model: {plain.base_path}")
    print(f"adapter:    {adapter} (rank {tuned.adapter.rank}, {len(tuned.lora_sites)} LoRA sites)")
    print("mode:       plaintext inference on this machine (secure generation comes with the runtime)\n")
    for number, pair in enumerate(load_qa(split="heldout")[:questions], start=1):
        print(f"Q{number}: {pair.question}")
        print(f"  expected: {pair.answer}")
        for label, loaded in (("base model", plain), ("fine-tuned", tuned)):
            start = time.perf_counter()
            answer = ask(loaded.model, loaded.tokenizer, pair.question)
            _show(label, answer, pair.keyword, time.perf_counter() - start)
        print()
