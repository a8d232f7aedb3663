"""Ask a model questions (plaintext, greedy) and measure how many stated the expected facts."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from privlora.models.hf_tokenizer import encode_chat
from privlora.tools.qa import QAPair, states_fact
from privlora.client.generation import CausalStep, GenerationConfig, generate_batch

DEFAULT_ANSWER_TOKENS = 40  # the dataset's answers are at most 20 words
EVAL_BATCH = 10


def ask_many(model: CausalStep, tokenizer: PreTrainedTokenizerBase, questions: list[str],
             max_new_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[str]:
    """The model's greedy answers to chat questions, decoded together as one batch."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,))
    rows = generate_batch(model, [encode_chat(tokenizer, question) for question in questions], config)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in rows]


def ask(model: CausalStep, tokenizer: PreTrainedTokenizerBase, question: str,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS) -> str:
    """The model's greedy answer to one chat question."""
    return ask_many(model, tokenizer, [question], max_new_tokens)[0]


@dataclass(frozen=True)
class FactCheck:
    pair: QAPair
    answer: str

    @property
    def stated(self) -> bool:
        return states_fact(self.answer, self.pair.keyword)


@dataclass(frozen=True)
class FactReport:
    checks: tuple[FactCheck, ...]

    @property
    def matched(self) -> int:
        return sum(check.stated for check in self.checks)

    @property
    def match_rate(self) -> float:
        return self.matched / len(self.checks) if self.checks else 0.0


def evaluate_facts(model: CausalStep, tokenizer: PreTrainedTokenizerBase, pairs: list[QAPair],
                   label: str = "evaluate", batch_size: int = EVAL_BATCH) -> FactReport:
    """Ask every question (in batches) and check each answer for its fact's keyword."""
    checks: list[FactCheck] = []
    with tqdm(total=len(pairs), desc=label, unit="q", disable=None) as bar:
        for first in range(0, len(pairs), batch_size):
            batch = pairs[first : first + batch_size]
            answers = ask_many(model, tokenizer, [pair.question for pair in batch])
            checks.extend(FactCheck(pair, answer) for pair, answer in zip(batch, answers))
            bar.update(len(batch))
    return FactReport(tuple(checks))
