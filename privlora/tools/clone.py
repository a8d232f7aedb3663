"""``privlora attack clone``: rebuild an adapter's function from what a client saw in ordinary use.

The client runs the public base model itself, so at every LoRA site it knows its own input rows
``x`` and the deltas ``dW x`` it got back (``client/transcript.py``). Least squares on those rows
recovers ``dW`` on the span the rows cover; once they span ``d_in``, the fit is exact up to the
backend's error, which averages away. No chosen input is needed: an ordinary chat does it.

Fits: ``lstsq`` (minimum-norm least squares: exact on the span seen, zero off it), ``ridge``
(shrinks the directions seen least) and an optional truncation to rank r. The clone is written as
a standard peft LoRA adapter directory (one rank for every site, zero-padded; ``lora_alpha = r``,
so the scaling is 1) that transformers + peft and privlora load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from privlora.client.generation import GenerationConfig
from privlora.client.transcript import SiteRows
from privlora.client.transports import Transport
from privlora.errors import PrivloraError
from privlora.models.lora import ADAPTER_CONFIG, PEFT_PREFIX, LoraAdapter, LoraSite
from privlora.tools.evaluate import DEFAULT_ANSWER_TOKENS, EVAL_BATCH
from privlora.tools.qa import QAPair, load_qa, states_fact

METHODS = ("lstsq", "ridge")
RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest are the fit's rounding, not the map
CLONE_WEIGHTS = "adapter_model.safetensors"


class CloneError(PrivloraError):
    """A transcript that cannot be fitted as asked."""


@dataclass(frozen=True)
class SiteFit:
    """One site's fitted map ``delta = weight @ x``, and how much of the input space it saw."""

    module: str
    weight: np.ndarray  # float64 [d_out, d_in]
    rows: int
    span: int  # the rank of the rows seen: the fit is determined on that many of d_in directions

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def determined(self) -> bool:
        return self.span >= self.d_in


def fit_site(site: SiteRows, method: str = "lstsq", rank: int | None = None, ridge: float = 1e-3) -> SiteFit:
    """The least-squares map from a site's rows to its deltas (``ridge``: relative to the rows'
    mean energy per dimension), truncated to ``rank`` when given."""
    if method not in METHODS:
        raise CloneError(f"unknown fit {method!r} (known: {', '.join(METHODS)})")
    x, y = site.x.astype(np.float64), site.delta.astype(np.float64)
    if site.rows == 0:
        raise CloneError(f"no rows for {site.module}")
    if method == "lstsq":
        solution, _, span, _ = np.linalg.lstsq(x, y, rcond=None)
    else:
        gram = x.T @ x
        span = int(np.linalg.matrix_rank(x))
        shrink = ridge * np.trace(gram) / gram.shape[0]
        solution = np.linalg.solve(gram + shrink * np.eye(gram.shape[0]), x.T @ y)
    weight = solution.T
    if rank is not None:
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        weight = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return SiteFit(site.module, weight, site.rows, int(span))


def fit_transcript(sites: Sequence[SiteRows], method: str = "lstsq", rank: int | None = None,
                   ridge: float = 1e-3) -> list[SiteFit]:
    return [fit_site(site, method, rank, ridge) for site in sites]


def _factors(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``B A = weight`` with A's rows orthonormal: A = V^T, B = U S, at the weight's numerical rank."""
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    keep = max(1, int((s > RANK_TOLERANCE * s[0]).sum())) if s.size and s[0] > 0 else 1
    return vt[:keep], u[:, :keep] * s[:keep]


def clone_adapter(fits: Sequence[SiteFit], path: Path) -> LoraAdapter:
    """The fits as one adapter: every site at the largest rank among them, zero-padded."""
    factors = [_factors(fit.weight) for fit in fits]
    rank = max(a.shape[0] for a, _ in factors)
    sites = []
    for fit, (a, b) in zip(fits, factors):
        padded_a = np.zeros((rank, fit.d_in)); padded_a[: a.shape[0]] = a
        padded_b = np.zeros((b.shape[0], rank)); padded_b[:, : b.shape[1]] = b
        sites.append(LoraSite(fit.module, torch.from_numpy(padded_a).float(), torch.from_numpy(padded_b).float(), 1.0))
    targets = tuple(sorted({fit.module.rsplit(".", 1)[-1] for fit in fits}))
    return LoraAdapter(path, rank, float(rank), 1.0, targets, tuple(sites))


def write_adapter(adapter: LoraAdapter, base_name: str) -> Path:
    """A peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    out = Path(adapter.path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for site in adapter.sites:
        tensors[f"{PEFT_PREFIX}{site.module}.lora_A.weight"] = site.lora_A.contiguous()
        tensors[f"{PEFT_PREFIX}{site.module}.lora_B.weight"] = site.lora_B.contiguous()
    save_file(tensors, str(out / CLONE_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": list(adapter.target_modules), "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "inference_mode": True}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class Fidelity:
    """How closely a clone does what the adapter does, on questions it never saw."""

    rows: int  # rows per site the clone was fitted on
    determined_sites: int  # sites whose rows spanned d_in
    sites: int
    questions: int
    clone_states_fact: float  # share of answers that state the fact (the adapter's own is beside it)
    adapter_states_fact: float
    identical_answers: float  # share of answers identical, token for token, to the adapter's
    token_agreement: float  # share of the adapter's answer tokens the clone reproduces in place
    delta_error: float  # median over sites of ||clone dW x - dW x|| / ||dW x|| on the questions' rows

    def to_json(self) -> dict:
        return asdict(self)


def _site_inputs(model: torch.nn.Module, modules: Sequence[str], prompts: Sequence[list[int]]) -> dict[str, np.ndarray]:
    """Each LoRA site's input rows over the prompts, from the adapter's own forward pass."""
    from privlora.client.generation import GenerationConfig, generate_batch
    from privlora.models.step import TorchStep

    captured: dict[str, list[np.ndarray]] = {module: [] for module in modules}

    def keep(module: str):
        return lambda _layer, inputs, _output: captured[module].append(inputs[0].reshape(-1, inputs[0].shape[-1]).numpy())

    named = dict(model.named_modules())
    hooks = [named[module].register_forward_hook(keep(module)) for module in modules]
    try:
        for prompt in prompts:  # one prefill each: the rows of the prompt, no padding
            generate_batch(TorchStep(model), [prompt], GenerationConfig(max_new_tokens=1))
    finally:
        for hook in hooks:
            hook.remove()
    return {module: np.concatenate(rows).astype(np.float64) for module, rows in captured.items()}


def delta_error(adapter: LoraAdapter, fits: Sequence[SiteFit], inputs: dict[str, np.ndarray]) -> float:
    """Median over sites of the clone's relative delta error on held-out rows."""
    truth = {site.module: site.scaling * (site.lora_B.double() @ site.lora_A.double()).numpy() for site in adapter.sites}
    errors = []
    for fit in fits:
        x = inputs[fit.module]
        want = x @ truth[fit.module].T
        errors.append(float(np.linalg.norm(x @ fit.weight.T - want) / max(np.linalg.norm(want), 1e-30)))
    return float(np.median(errors))


@dataclass(frozen=True)
class Reference:
    """The real adapter's greedy answers to held-out questions, and its sites' inputs on them."""

    base: str
    adapter: LoraAdapter
    pairs: tuple[QAPair, ...]
    prompts: tuple[list[int], ...]
    answers: tuple[list[int], ...]
    texts: tuple[str, ...]
    inputs: dict[str, np.ndarray]
    config: GenerationConfig


def greedy_answers(model: torch.nn.Module, prompts: Sequence[list[int]], config: GenerationConfig) -> list[list[int]]:
    from privlora.client.generation import generate_batch
    from privlora.models.step import TorchStep

    return [row for first in range(0, len(prompts), EVAL_BATCH)
            for row in generate_batch(TorchStep(model), list(prompts[first:first + EVAL_BATCH]), config)]


def reference(adapter_dir: str | Path, base: str = "smollm2", questions: int = 70,
              max_new_tokens: int = DEFAULT_ANSWER_TOKENS) -> Reference:
    """What a clone is measured against: the demo's held-out questions through the real adapter."""
    from privlora.models.hf_tokenizer import encode_chat
    from privlora.models.loading import load_model

    real = load_model(base, adapter_dir)
    assert real.adapter is not None and real.tokenizer is not None
    pairs = tuple(load_qa(split="heldout")[:questions])
    prompts = tuple(encode_chat(real.tokenizer, pair.question) for pair in pairs)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(real.tokenizer.eos_token_id,))
    answers = tuple(greedy_answers(real.model, prompts, config))
    texts = tuple(real.tokenizer.decode(row, skip_special_tokens=True) for row in answers)
    inputs = _site_inputs(real.model, [site.module for site in real.adapter.sites], prompts)
    return Reference(base, real.adapter, pairs, prompts, answers, texts, inputs, config)


def evaluate_clone(fits: Sequence[SiteFit], clone_dir: Path, truth: Reference) -> Fidelity:
    """The clone, loaded from its peft directory as a user would, against the real adapter."""
    from privlora.models.loading import load_model

    clone = load_model(truth.base, clone_dir)
    assert clone.tokenizer is not None
    answers = greedy_answers(clone.model, truth.prompts, truth.config)
    texts = [clone.tokenizer.decode(row, skip_special_tokens=True) for row in answers]
    agreement = [a == b for want, got in zip(truth.answers, answers) for a, b in zip(want, got)]
    n = len(truth.pairs)
    return Fidelity(rows=max(fit.rows for fit in fits), determined_sites=sum(fit.determined for fit in fits),
                    sites=len(fits), questions=n,
                    clone_states_fact=sum(states_fact(t, p.keyword) for t, p in zip(texts, truth.pairs)) / n,
                    adapter_states_fact=sum(states_fact(t, p.keyword) for t, p in zip(truth.texts, truth.pairs)) / n,
                    identical_answers=sum(a == b for a, b in zip(truth.answers, answers)) / n,
                    token_agreement=sum(agreement) / max(len(agreement), 1),
                    delta_error=delta_error(truth.adapter, fits, truth.inputs))


def record_chats(artifact: str | Path, questions: Sequence[str], directory: str | Path,
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, transport: Transport | None = None) -> int:
    """Ask each question in a fresh conversation (default: through an in-process server on
    ``artifact``), recording what the client sees as ``privlora chat --record`` does; returns the
    rows recorded."""
    from privlora.client.assistant import Assistant, Reply
    from privlora.local import local_transport

    transport = transport or local_transport(artifact)
    assistant = Assistant(artifact, transport, cache_keys=False, record=directory)
    config = assistant.config(max_new_tokens)
    rows = 0
    try:
        for question in questions:
            prompt = assistant.encode(question)
            reply = Reply(prompt_tokens=len(prompt))
            for _ in assistant.stream(prompt, config, reply):
                pass
            rows += len(prompt) + len(reply.generated) - 1  # the last token is never fed back
    finally:
        assistant.close()
    return rows
