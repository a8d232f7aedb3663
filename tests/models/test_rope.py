"""Rotary embeddings and their ``rope_scaling`` variants against transformers 4.47.1's own
modules, bit for bit and step by step as a KV-cache decode calls them (the length-dependent
variants change their frequencies past the original context), and the refused rope configurations."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3LongRoPEScaledRotaryEmbedding

from conftest import TINY_LLAMA, TINY_PHI3
from privlora.errors import UnsupportedModelError
from privlora.models.architectures.phi3 import rope_of
from privlora.models.rope import RotaryEmbedding, llama_rope

HEAD_DIM = TINY_LLAMA["head_dim"]
CONTEXT = 8
# A prefill of 6 positions, then one decode step at a time up to 12: past the context of 8.
STEPS = [torch.arange(6).unsqueeze(0)] + [torch.tensor([[p]]) for p in range(6, 12)]
LLAMA_SCALINGS = {
    "none": None,
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "legacy-type-key": {"type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Our cos/sin are [B, 1, S, D] (broadcast over heads); transformers' are [B, S, D]."""
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine.squeeze(1), reference)


@pytest.mark.parametrize("name", sorted(LLAMA_SCALINGS))
def test_llama_variants_equal_transformers_step_by_step(name):
    # Copies: LlamaConfig adds rope_type to a legacy dict in place, and ours must read it as written.
    config = transformers.LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": CONTEXT,
                                         "rope_scaling": copy.deepcopy(LLAMA_SCALINGS[name])})
    theirs = LlamaRotaryEmbedding(config=config)  # stateful: dynamic rescales as the length grows
    ours = RotaryEmbedding(llama_rope({"rope_scaling": copy.deepcopy(LLAMA_SCALINGS[name])}, HEAD_DIM, CONTEXT))
    for positions in STEPS:
        assert_same(ours(positions), theirs(torch.zeros(1), positions))


def test_dynamic_rescales_only_past_the_context():
    rope = llama_rope({"rope_scaling": LLAMA_SCALINGS["dynamic"]}, HEAD_DIM, CONTEXT)
    default = RotaryEmbedding(llama_rope({}, HEAD_DIM, CONTEXT))
    dynamic = RotaryEmbedding(rope)
    within, beyond = torch.arange(CONTEXT).unsqueeze(0), torch.arange(CONTEXT + 1).unsqueeze(0)
    assert torch.equal(dynamic(within)[0], default(within)[0])
    assert (dynamic(beyond)[0] - default(beyond)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1, 32])  # max_position_embeddings / original: no attention factor, then one
def test_phi3_longrope_equals_transformers_step_by_step(scale):
    rope_scaling = {"type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
                    "long_factor": [2.0 + i for i in range(8)]}
    config = transformers.Phi3Config(**{**TINY_PHI3, "max_position_embeddings": CONTEXT * scale,
                                        "original_max_position_embeddings": CONTEXT, "rope_scaling": rope_scaling})
    theirs = Phi3LongRoPEScaledRotaryEmbedding(HEAD_DIM, config)
    ours = RotaryEmbedding(rope_of(config.to_dict(), HEAD_DIM, config.max_position_embeddings))
    for positions in STEPS:  # Phi3Attention passes the cache length, max(positions) + 1 without padding
        assert_same(ours(positions), theirs(torch.zeros(1), positions, seq_len=int(positions.max()) + 1))


@pytest.mark.parametrize(("rope_scaling", "message"), [
    ({"rope_type": "yarn", "factor": 4.0}, "type 'yarn' is not supported"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "type 'longrope' is not supported"),
    ({"factor": 2.0}, "neither 'rope_type' nor 'type'"),
    ({"rope_type": "linear"}, "lacks the field 'factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0},
     "lacks the field 'high_freq_factor'"),
])
def test_refused_llama_rope_scaling(rope_scaling, message):
    with pytest.raises(UnsupportedModelError, match=message):
        llama_rope({"rope_scaling": rope_scaling}, HEAD_DIM, CONTEXT)


def test_partial_rotary_factor_is_refused():
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.5"):
        llama_rope({"partial_rotary_factor": 0.5}, HEAD_DIM, CONTEXT)
