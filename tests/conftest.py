"""Shared fixtures: tiny random-weight Llama checkpoints and peft adapters, and the embedded
SmolLM2 base model (converted once into the user cache)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# Variants the definition must match transformers on: GQA, MHA, MQA, tied embeddings, biases.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "smollm2-shape": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                          tie_word_embeddings=True, rope_theta=100000.0),
}


def write_tiny_llama(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight transformers LlamaForCausalLM checkpoint (config.json + safetensors)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so that mistakes show in the logits
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_tiny_qwen2(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight transformers Qwen2ForCausalLM checkpoint (q/k/v biases included)."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_LLAMA.items() if k != "head_dim"}  # Qwen2 derives head_dim
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**fields, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_tiny_adapter(base_dir: Path, directory: Path, targets: list[str], rank: int = 4,
                       alpha: float = 8.0, seed: int = 1, **lora: Any) -> Path:
    """Save a peft LoRA adapter with random (non-zero) A and B for the checkpoint at base_dir."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Every character the tiny tokenizer knows ("▁" stands for a space); anything else encodes as unk.
TINY_ALPHABET = string.ascii_letters + string.digits + string.punctuation + "\n▁"


def write_tiny_tokenizer(directory: Path, vocab_size: int = TINY_LLAMA["vocab_size"]) -> Path:
    """Save a real ChatML tokenizer whose ids all fit a tiny model's vocabulary: a character BPE
    (sentencepiece-style spaces) trained on the calibration prompts, with eos ``<|im_end|>`` and
    pad ``<|endoftext|>``, saved by transformers next to a tiny checkpoint."""
    from privlora.tools.bench import CALIBRATION_PROMPTS  # here: bench pulls in the backends

    backend = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=list(TINY_ALPHABET), limit_alphabet=len(TINY_ALPHABET))
    backend.train_from_iterator(CALIBRATION_PROMPTS.read_text().splitlines(), trainer)
    if backend.get_vocab_size() > vocab_size:
        raise ValueError(f"the tiny tokenizer needs {backend.get_vocab_size()} ids, more than {vocab_size}")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from privlora.models.loading import resolve_base

    return resolve_base("smollm2")


def step_inputs(input_ids: torch.Tensor, past_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and an all-ones attention mask for new tokens after ``past_length`` cached ones."""
    batch, length = input_ids.shape
    positions = torch.arange(past_length, past_length + length).expand(batch, length)
    return positions, torch.ones((batch, past_length + length), dtype=torch.int64)


class TinyBuild:
    """A tiny Llama checkpoint (with a tokenizer) and a q+v adapter, compiled once per test session
    and backend configuration: every room's tests share these artifacts instead of compiling their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = write_tiny_tokenizer(write_tiny_llama(root / "base"))
        self.adapter = write_tiny_adapter(self.base, root / "adapter", ["q_proj", "v_proj"])
        self._artifacts: dict[str, Path] = {}

    def artifact(self, backend: str, **options: Any) -> Path:
        from privlora.compiler.driver import compile_artifact

        key = backend + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        if key not in self._artifacts:
            self._artifacts[key] = compile_artifact(str(self.base), self.adapter, self.root / key, backend=backend,
                                                    backend_options=options).artifact
        return self._artifacts[key]


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> TinyBuild:
    return TinyBuild(tmp_path_factory.mktemp("tiny-build"))


def write_tiny_checkpoint(directory: Path, config: transformers.PretrainedConfig, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of ``config``'s transformers causal LM class, with weights
    scaled up as in :func:`write_tiny_llama`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_tiny_mistral(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight MistralForCausalLM without a sliding window (the tiny Llama's sizes)."""
    fields = {**TINY_LLAMA, "sliding_window": None, **overrides}
    return write_tiny_checkpoint(directory, transformers.MistralConfig(**fields), seed)


# Phi-3 derives head_dim (16); Phi3Config's default pad and eos id 32000 lie outside a 160-token vocabulary.
TINY_PHI3: dict[str, Any] = dict(
    {k: v for k, v in TINY_LLAMA.items() if k != "head_dim"}, original_max_position_embeddings=256,
    pad_token_id=None, bos_token_id=1, eos_token_id=2)


def write_tiny_phi3(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight Phi3ForCausalLM (fused qkv_proj and gate_up_proj)."""
    return write_tiny_checkpoint(directory, transformers.Phi3Config(**{**TINY_PHI3, **overrides}), seed)


TINY_GEMMA: dict[str, Any] = dict(  # head_dim 24, not hidden_size / heads = 16, as Gemma's is its own field
    TINY_LLAMA, head_dim=24, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")


def write_tiny_gemma(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight GemmaForCausalLM (tied embeddings, its own head_dim, GeLU-tanh MLP)."""
    return write_tiny_checkpoint(directory, transformers.GemmaConfig(**{**TINY_GEMMA, **overrides}), seed)


@torch.no_grad()
def cached_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding through a transformers model's own KV cache, one token per forward call:
    the reference for decoding past a model's original context."""
    output = model(torch.tensor([prompt]), use_cache=True)
    tokens = [int(output.logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        output = model(torch.tensor([tokens[-1:]]), past_key_values=output.past_key_values, use_cache=True)
        tokens.append(int(output.logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def logits_and_reference(checkpoint: Path, reference_class: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Our definition's logits and transformers' (eager attention) on the same random batch."""
    from privlora.models.checkpoint import build_model

    input_ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 11))
    reference = reference_class.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    model = build_model(checkpoint)
    return model(input_ids, *step_inputs(input_ids), *model.empty_cache(2))[0], reference(input_ids).logits
