"""SmolLM2 + the demo adapter, compiled end to end: 30 rounds per step, and the ONNX segments with
plaintext private rounds reproduce the original model's logits for prefill and decode."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import step_inputs
from support.leakscan import adapter_secrets, find_leaks, public_base
from privlora.paths import DEMO_ADAPTER
from privlora.core.artifact import CLIENT
from privlora.compiler.driver import compile_artifact
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.models.hf_tokenizer import encode_chat
from privlora.local import open_local

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2_dir):
    report = compile_artifact("smollm2", DEMO_ADAPTER, tmp_path_factory.mktemp("smollm2") / "artifact",
                              backend="reference")
    print(f"compile {report.seconds:.0f} s, client {report.client_bytes / 1e6:.0f} MB, "
          f"server {report.server_bytes / 1e6:.2f} MB")
    return report


def test_thirty_rounds_per_step(artifact):
    assert (artifact.sites, artifact.rounds, artifact.segments) == (60, 30, 31)


def test_prefill_and_decode_match_the_original_model(artifact):
    loaded = load_model("smollm2", DEMO_ADAPTER)
    model = TorchStep(loaded.model)
    runner = open_local(artifact.artifact)
    prompt = np.array([encode_chat(loaded.tokenizer, "Who is the clinic's practice manager?")])

    def inputs(tokens, position=0):
        return (tokens, *(t.numpy() for t in step_inputs(torch.from_numpy(tokens), position)))

    worst = 0.0
    reference = model(*inputs(prompt), *model.empty_cache(1))
    compiled = runner(*inputs(prompt), *runner.empty_cache(1))
    for _ in range(4):  # greedy decode steps, each side with its own cache
        worst = max(worst, np.abs(reference[0] - compiled[0]).max())
        assert reference[0][0, -1].argmax() == compiled[0][0, -1].argmax()
        token = reference[0][:, -1:].argmax(-1)
        position = reference[1].shape[3]
        reference = model(*inputs(token, position), *reference[1:])
        compiled = runner(*inputs(token, position), *compiled[1:])
    worst = max(worst, np.abs(reference[0] - compiled[0]).max())
    print(f"max |logits compiled - original| over prefill + 4 decode steps: {worst:.2e}")
    # float32 kernels differ (ONNX Runtime's MLAS vs torch's MKL) and SmolLM2's residual stream
    # reaches thousands: 8.9e-5 measured on logits up to 36.
    assert worst < 1e-4


def test_client_bundle_holds_no_demo_adapter_weight(artifact, smollm2_dir):
    secrets = adapter_secrets(DEMO_ADAPTER, sites=6)  # three layers' q and v sites, A, B and dW each
    files = [p for p in (artifact.artifact / CLIENT).rglob("*") if p.is_file()]
    started = time.perf_counter()
    leaks = find_leaks(files, secrets, public_base(smollm2_dir, DEMO_ADAPTER))  # W0 of all 60 sites
    print(f"leak scan of {len(files)} client files: {time.perf_counter() - started:.0f} s")
    assert leaks == []
