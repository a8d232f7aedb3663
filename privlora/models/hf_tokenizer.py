"""Tokenizer loading and chat-prompt encoding, with the SmolLM2 GGUF quirks handled.

The GGUF tokenizer declares ``<|im_start|>`` as both bos and eos and has no pad token. The chat
model ends its turns with ``<|im_end|>``, so that is the eos; ``<|endoftext|>`` becomes the pad. The
chat template already starts with ``<|im_start|>``: templated text is encoded with
``add_special_tokens=False`` so the prompt does not start with it twice.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from privlora.errors import PrivloraError

CHATML_END = "<|im_end|>"
CHATML_PAD = "<|endoftext|>"


def fix_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make eos the end-of-turn token of ChatML models and make sure a pad token exists."""
    vocab = tokenizer.get_vocab()
    if CHATML_END in vocab and tokenizer.eos_token != CHATML_END:
        tokenizer.eos_token = CHATML_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHATML_PAD if CHATML_PAD in vocab else tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local checkpoint directory."""
    if not has_tokenizer(path):
        raise PrivloraError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return fix_special_tokens(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The model's chat template applied to one user turn, ready for the assistant's answer."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of :func:`chat_prompt` without a second, doubled bos token."""
    return tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
