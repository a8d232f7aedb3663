"""Ask a model questions (plaintext, greedy) and measure how many stated the expected facts."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from privlora.models.tokenizer import encode_chat
from privlora.qa import QAPair, states_fact
from privlora.runtime.generation import CausalStep, GenerationConfig, generate

DEFAULT_ANSWER_TOKENS = 48


def ask(model: CausalStep, tokenizer: PreTrainedTokenizerBase, question: str,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS) -> str:
    """The model's greedy answer to one chat question."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,))
    tokens = list(generate(model, encode_chat(tokenizer, question), config))
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


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
                   label: str = "evaluate") -> FactReport:
    """Ask every question and check each answer for its fact's keyword."""
    checks = [FactCheck(pair, ask(model, tokenizer, pair.question)) for pair in tqdm(pairs, desc=label, unit="q")]
    return FactReport(tuple(checks))
