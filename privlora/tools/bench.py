"""``privlora bench``: per-site cost and accuracy of each backend at the two reference shapes.

- ``smollm2``: the fused q+v site of SmolLM2-135M with the demo adapter (576 -> 576+192, two
  rank-8 LoRAs sharing one input). Accuracy is measured on real activations: the q_proj inputs of
  every layer while the model reads the calibration prompts (``privlora/data/calibration.txt``).
- ``chatglm2``: ChatGLM2-6B's ``query_key_value`` (4096 -> 4608, rank 8), random weights at
  those shapes and Gaussian activations.

Per site: key generation, evaluation-key bytes, client encrypt, server evaluate, client decrypt
(medians over ``repeats`` single-row calls, i.e. one decode step), bytes up and down, and the
relative L2 error against the float LoRA. The per-token private cost multiplies by the number of
sites a decode step runs (30 for SmolLM2, 28 for ChatGLM2-6B); the transport is not included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from privlora import backends
from privlora.backends.base import Preprocessing
from privlora.backends.exchange import ExchangeCost, exchange, local_send
from privlora.core.types import GroupSpec, PLLSite
from privlora.paths import DATA_DIR

CALIBRATION_PROMPTS = DATA_DIR / "calibration.txt"
PAPER_SECONDS_PER_TOKEN = 1.61  # Zhang et al. 2501.01672, ChatGLM2-6B, LoRA r=8
IDLE_S = 0.05  # pause before each timed call: a server is idle while its client runs the public part


@dataclass
class SiteCase:
    """One site shape: the group to time, and (group, weights, activations) to check accuracy on."""

    name: str
    sites_per_token: int
    timing: tuple[GroupSpec, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray]
    accuracy: list[tuple[GroupSpec, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray]]
    rows: int = 1  # rows per timed call: 1 for a decode step, the prompt length for a prefill


@dataclass
class SiteResult:
    backend: str
    case: str
    d_in: int
    d_out: int
    rank: int
    keygen_s: float
    evaluation_key_bytes: int
    encrypt_ms: float
    evaluate_ms: float
    decrypt_ms: float
    bytes_up: int
    bytes_down: int
    messages: int  # client -> server messages of one call
    offline_ms: float  # work done ahead of time for one call (encryptions of zero, or pads)
    rows: int
    relative_error_max: float
    relative_error_median: float
    accuracy_rows: int
    sites_per_token: int
    pooled_bytes: int = 0  # client memory the pads of one call's rows hold until used

    @property
    def site_ms(self) -> float:
        return self.encrypt_ms + self.evaluate_ms + self.decrypt_ms

    @property
    def seconds_per_token(self) -> float:
        return self.sites_per_token * self.site_ms / 1000

    @property
    def bytes_per_token(self) -> int:
        return self.sites_per_token * (self.bytes_up + self.bytes_down)

    def to_json(self) -> dict:
        return {**asdict(self), "site_ms": self.site_ms, "seconds_per_token": self.seconds_per_token,
                "bytes_per_token": self.bytes_per_token, "paper_seconds_per_token": PAPER_SECONDS_PER_TOKEN}


def smollm2_case(rows_per_layer: int = 8, seed: int = 0, rows: int = 1) -> SiteCase:
    """Real weights (demo adapter) and real q_proj inputs from the calibration prompts; timed on
    ``rows`` rows of layer 0 at once (1: a decode step; 52: one prompt's prefill)."""
    from privlora.paths import DEMO_ADAPTER
    from privlora.models.loading import load_model
    from privlora.models.hf_tokenizer import encode_chat
    from privlora.models.step import TorchStep
    from privlora.client.generation import GenerationConfig, generate

    loaded = load_model("smollm2", DEMO_ADAPTER)
    layers = sorted({name.rsplit(".", 1)[0] for name in loaded.lora_sites if name.endswith("q_proj")},
                    key=lambda n: int(n.split(".")[-2]))
    captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [loaded.model.get_submodule(f"{layer}.q_proj").register_forward_hook(
        lambda module, inputs, output, layer=layer: captured[layer].append(inputs[0].reshape(-1, inputs[0].shape[-1])))
        for layer in layers]
    try:
        for prompt in CALIBRATION_PROMPTS.read_text().splitlines():
            list(generate(TorchStep(loaded.model), encode_chat(loaded.tokenizer, prompt), GenerationConfig(max_new_tokens=1)))
    finally:
        for hook in hooks:
            hook.remove()
    rng = np.random.default_rng(seed)
    accuracy = []
    for index, layer in enumerate(layers):
        q, v = (loaded.model.get_submodule(f"{layer}.{proj}") for proj in ("q_proj", "v_proj"))
        sites = tuple(PLLSite(2 * index + k, f"{layer}.{proj}", m.lora_A.in_features, m.lora_B.out_features,
                              m.lora_A.out_features, float(m.scaling)) for k, (proj, m) in enumerate((("q_proj", q), ("v_proj", v))))
        weights = {site.site_id: (m.lora_A.weight.detach().numpy(), m.lora_B.weight.detach().numpy())
                   for site, m in zip(sites, (q, v))}
        activations = torch.cat(captured[layer]).numpy()
        pick = rng.choice(len(activations), size=min(rows_per_layer, len(activations)), replace=False)
        accuracy.append((GroupSpec(f"layer_{index}", 0, 0, 0, sites), weights, activations[pick]))
    group, weights, _ = accuracy[0]
    first = torch.cat(captured[layers[0]]).numpy()
    timing = (group, weights, first if rows == 1 else first[:rows])
    return SiteCase("smollm2" if rows == 1 else "smollm2-prefill", len(layers), timing, accuracy, rows)


def chatglm2_case(rows: int = 8, seed: int = 0) -> SiteCase:
    """ChatGLM2-6B query_key_value shapes (4096 -> 4608, r = 8, alpha 16) with random weights."""
    rng = np.random.default_rng(seed)
    site = PLLSite(0, "transformer.encoder.layers.0.self_attention.query_key_value", 4096, 4608, 8, 2.0)
    weights = {0: (rng.normal(0, 4096**-0.5, (8, 4096)).astype(np.float32), rng.normal(0, 0.02, (4608, 8)).astype(np.float32))}
    group = GroupSpec("layer_0", 0, 0, 0, (site,))
    case = (group, weights, rng.normal(0, 1, (rows, 4096)).astype(np.float32))
    return SiteCase("chatglm2", 28, case, [case])


OFFLINE_BATCH = 256  # pad rows one offline exchange carries when a client fills its pool
PREFILL_ROWS = 52  # the demo's first question: a 52-token prompt

CASES: dict[str, Callable[[], SiteCase]] = {"smollm2": smollm2_case, "chatglm2": chatglm2_case,
                                            "smollm2-prefill": lambda: smollm2_case(rows=PREFILL_ROWS)}


def exact_delta(group: GroupSpec, weights, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.concatenate([(x @ weights[s.site_id][0].T.astype(np.float64)) @ weights[s.site_id][1].T.astype(np.float64)
                           * s.scaling for s in group.sites], axis=-1)


def bench_site(name: str, case: SiteCase, repeats: int = 5, options: dict | None = None) -> SiteResult:
    """Compile the case's groups for backend ``name``, time single-row calls, check accuracy."""
    module = backends.load(name)
    groups = [g for g, _, _ in case.accuracy]
    weights = {k: v for _, w, _ in case.accuracy for k, v in w.items()}
    build = module.compile(groups, weights, options or {})
    server = module.Server(build.server_tensors, groups, build.public_params)
    start = time.perf_counter()
    client = module.Client(build.client_params)
    keys = client.evaluation_keys()
    keygen = time.perf_counter() - start
    session = server.open_session(keys)

    group, _, activations = case.timing
    timings: dict[str, list[float]] = {"encrypt": [], "evaluate": [], "decrypt": [], "offline": []}
    cost = ExchangeCost()
    send = local_send(server, group, session)
    pad_ms, pad_bytes = _prepare_pads(client, case, repeats, server, session) if isinstance(client, Preprocessing) \
        else (0.0, 0.0)
    for i in range(repeats):
        time.sleep(IDLE_S)  # the server's idle time between steps, where work ahead of time happens
        x = activations[i % len(activations)][None] if case.rows == 1 else activations
        cost = ExchangeCost()
        offline = server.offline_seconds(session)
        exchange(client, group, x, send, cost)
        offline = server.offline_seconds(session) - offline + pad_ms * case.rows / 1000
        for key, seconds in zip(timings, (cost.encrypt_s, cost.server_s, cost.decrypt_s, offline)):
            timings[key].append(seconds * 1000)

    errors = []
    for acc_group, acc_weights, acc_x in tqdm(case.accuracy, desc=f"{name} accuracy on {case.name}", unit="layer", disable=None,
                                              leave=False):
        delta = exchange(client, acc_group, acc_x, local_send(server, acc_group, session)).astype(np.float64)
        expected = exact_delta(acc_group, acc_weights, acc_x)
        errors.append(float(np.linalg.norm(delta - expected) / np.linalg.norm(expected)))
    label = name + "".join(f" {key}={value}" for key, value in sorted((options or {}).items()))
    return SiteResult(label, case.name, group.d_in, group.d_out, sum(s.rank for s in group.sites), keygen, len(keys),
                      statistics.median(timings["encrypt"]), statistics.median(timings["evaluate"]),
                      statistics.median(timings["decrypt"]), int(cost.bytes_up), int(cost.bytes_down), int(cost.messages),
                      statistics.median(timings["offline"]), case.rows, max(errors),
                      statistics.median(errors), sum(len(x) for _, _, x in case.accuracy), case.sites_per_token,
                      int(pad_bytes * case.rows))


def _prepare_pads(client: Preprocessing, case: SiteCase, repeats: int, server, session) -> tuple[float, float]:
    """Pads for every call the bench makes; the offline milliseconds and client bytes per row of
    one batch of the timed group, the way a client makes them ahead of need."""
    group = case.timing[0]
    before, cost = client.pooled_bytes(), ExchangeCost()
    batch = max(repeats * case.rows, OFFLINE_BATCH)
    client.prepare(group, batch, local_send(server, group, session), cost)
    per_row_ms = 1000 * (cost.encrypt_s + cost.server_s + cost.decrypt_s) / batch
    per_row_bytes = (client.pooled_bytes() - before) / batch
    for acc_group, _, acc_x in case.accuracy:
        client.prepare(acc_group, len(acc_x), local_send(server, acc_group, session))
    return per_row_ms, per_row_bytes


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render(results: list[SiteResult]) -> str:
    header = ("backend", "site", "rows", "msgs", "keygen", "eval keys", "encrypt", "evaluate", "decrypt", "offline",
              "pad memory", "up", "down", "rel err (max)", "s/step", "bytes/step")
    rows = [header]
    for r in results:
        rows.append((r.backend, f"{r.case} {r.d_in}->{r.d_out} r{r.rank}", str(r.rows), str(r.messages),
                     f"{r.keygen_s:.2f} s", _size(r.evaluation_key_bytes), f"{r.encrypt_ms:.1f} ms",
                     f"{r.evaluate_ms:.1f} ms", f"{r.decrypt_ms:.1f} ms", f"{r.offline_ms:.1f} ms", _size(r.pooled_bytes), _size(r.bytes_up),
                     _size(r.bytes_down), f"{r.relative_error_max:.1e}",
                     f"{r.seconds_per_token:.2f} ({r.sites_per_token} sites)", _size(r.bytes_per_token)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"paper (Zhang et al. 2501.01672, ChatGLM2-6B r=8): {PAPER_SECONDS_PER_TOKEN} s/token")
    return "\n".join(lines)
