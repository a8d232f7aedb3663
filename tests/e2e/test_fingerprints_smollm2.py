"""Fingerprints on the real model: at the recommended strength an account's greedy answers to the
demo's held-out questions are the unmarked adapter's (through the real pads server, and for more
questions with the terms added to the float adapter); a fingerprint 250 times larger changes them."""

from __future__ import annotations

import pytest

from privlora.client.assistant import Assistant, Reply
from privlora.client.generation import GenerationConfig
from privlora.compiler.driver import compile_artifact
from privlora.local import InProcessTransport
from privlora.models.hf_tokenizer import encode_chat
from privlora.models.loading import load_model
from privlora.models.lora import attach_adapter
from privlora.models.registry import architecture
from privlora.paths import DEMO_ADAPTER
from privlora.server.accounts import AccountStore
from privlora.server.fingerprints import RECOMMENDED_STRENGTH, FingerprintKey, account_fingerprint
from privlora.server.private import PrivateServer
from privlora.tools.clone import greedy_answers
from privlora.tools.qa import load_qa
from privlora.tools.trace import marked_adapter, served_adapter

QUESTIONS = 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2_dir):
    return compile_artifact("smollm2", DEMO_ADAPTER, tmp_path_factory.mktemp("fp") / "pads", backend="pads").artifact


@pytest.fixture(scope="module")
def demo():
    tuned = load_model("smollm2", DEMO_ADAPTER)
    prompts = [encode_chat(tuned.tokenizer, pair.question) for pair in load_qa(split="heldout")[:QUESTIONS]]
    config = GenerationConfig(max_new_tokens=32, eos_token_ids=(tuned.tokenizer.eos_token_id,))
    return tuned, prompts, config, greedy_answers(tuned.model, prompts, config)


def marked_answers(artifact, demo, strength: float) -> list[list[int]]:
    tuned, prompts, config, _ = demo
    served = served_adapter(artifact)
    fingerprint = account_fingerprint(FingerprintKey(b"k" * 32, strength), "alice",
                                      [site.site for site in served.sites.values()])
    model = load_model("smollm2").model
    attach_adapter(model, marked_adapter(tuned.adapter, served, fingerprint), architecture("llama").lora_targets)
    return greedy_answers(model, prompts, config)


def test_recommended_fingerprints_leave_the_demo_answers_unchanged(artifact, demo):
    assert marked_answers(artifact, demo, RECOMMENDED_STRENGTH) == demo[3]


def test_control_a_fingerprint_250_times_larger_changes_them(artifact, demo):
    """(100 times, 0.2, left these 10 answers unchanged in our run; docs/security.md has 0.05 on 70.)"""
    assert marked_answers(artifact, demo, 250 * RECOMMENDED_STRENGTH) != demo[3]


def test_a_marked_account_gets_the_adapter_s_answer_through_the_pads_server(artifact, demo, tmp_path):
    store = AccountStore(tmp_path / "accounts.db", create=True)
    store.set_fingerprint_strength(RECOMMENDED_STRENGTH)
    token = store.create("alice")
    server = PrivateServer(artifact, accounts=store)
    assert server.fingerprint_key is not None and server.fingerprint_key.strength == RECOMMENDED_STRENGTH
    assistant = Assistant(artifact, InProcessTransport(server, token), cache_keys=False)
    _, prompts, config, expected = demo
    reply = Reply(prompt_tokens=len(prompts[0]))
    list(assistant.stream(prompts[0], config, reply))
    assistant.close()
    assert reply.generated == expected[0]
