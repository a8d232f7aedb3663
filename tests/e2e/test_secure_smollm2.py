"""Secure generation with SmolLM2 + the demo adapter over a real uvicorn server on 127.0.0.1,
with real encryption (pads, the default, made on the spot; bfv and ckks): the greedy answer to a held-out demo question is token for token the
plaintext fine-tuned model's."""

from __future__ import annotations

import pytest

from support.live import LiveServer
from privlora.paths import DEMO_ADAPTER
from privlora.compiler.driver import compile_artifact
from privlora.core.inspection import summary
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.models.hf_tokenizer import encode_chat
from privlora.tools.qa import load_qa
from privlora.client.secure import SecureClient
from privlora.client.timings import render_timings
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import HttpTransport

pytestmark = pytest.mark.smollm2


@pytest.mark.parametrize("backend", ["pads", "bfv", "ckks"])
def test_secure_greedy_answer_equals_the_plaintext_fine_tuned_model(tmp_path, smollm2_dir, backend):
    report = compile_artifact("smollm2", DEMO_ADAPTER, tmp_path / "artifact", backend=backend)
    info = summary(report.artifact)
    assert (info["rounds_per_step"], info["messages_per_step"]) == (30, {"pads": 30, "bfv": 60, "ckks": 30}[backend])
    tuned = load_model("smollm2", DEMO_ADAPTER)
    question = load_qa(split="heldout")[0].question
    prompt = encode_chat(tuned.tokenizer, question)
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=(tuned.tokenizer.eos_token_id,))
    server = LiveServer(report.artifact)
    try:
        client = SecureClient(report.artifact, HttpTransport(server.url), cache_keys=False)
        secure = list(generate(client, prompt, config))
        client.close()
    finally:
        server.stop()
    print(f"\n{question}\n-> {tuned.tokenizer.decode(secure)}\n{render_timings(client.steps)}")
    assert secure == list(generate(TorchStep(tuned.model), prompt, config))
