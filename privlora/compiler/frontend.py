"""Frontend: trace a model (architecture definition + attached adapter) into a torch.fx graph.

privlora's architecture definitions take the KV cache as explicit tensors, so one graph serves
the prefill step (empty cache, the whole prompt) and the decode step (one token, the cache).
Each LoRA-adapted Linear is kept as a single ``call_module`` node (a leaf), so every LoRA site is
one identifiable node whose target is the Hugging Face module path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Tracer

from privlora.models.lora import LoraLinear


class LoraLeafTracer(Tracer):
    """Standard symbolic tracing, except that LoRA-adapted Linears stay one node each."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, LoraLinear) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> GraphModule:
    """The model's step function as a GraphModule (same signature as ``model.forward``)."""
    graph = LoraLeafTracer().trace(model)
    return GraphModule(model, graph, class_name=type(model).__name__)


@dataclass(frozen=True)
class SampleStep:
    """Concrete inputs of one step, used for numeric checks and ONNX export."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    past_keys: Tensor
    past_values: Tensor

    def args(self) -> tuple[Tensor, ...]:
        return (self.input_ids, self.position_ids, self.attention_mask, self.past_keys, self.past_values)


@torch.no_grad()
def sample_steps(model: nn.Module, prompt_length: int = 7, seed: int = 0) -> tuple[SampleStep, ...]:
    """A prefill step over ``prompt_length`` random tokens, the decode step that follows it, and a
    left-padded two-row prefill. Between them every batch, sequence and cache dimension takes
    two different sizes, which is how lowering tells dynamic dimensions from fixed ones."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (1, prompt_length), generator=generator)
    positions = torch.arange(prompt_length).unsqueeze(0)
    prefill = SampleStep(input_ids, positions, torch.ones_like(input_ids), *model.empty_cache(1))
    _, keys, values = model(*prefill.args())
    token = torch.randint(0, vocab, (1, 1), generator=generator)
    decode = SampleStep(token, torch.tensor([[prompt_length]]), torch.ones((1, prompt_length + 1), dtype=torch.int64),
                        keys, values)
    rows = torch.randint(0, vocab, (2, 4), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    batched = SampleStep(rows, (mask.cumsum(-1) - 1).clamp(min=0), mask, *model.empty_cache(2))
    return prefill, decode, batched
