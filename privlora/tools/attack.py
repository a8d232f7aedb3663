"""``privlora attack extract``: a malicious client that holds its own keys queries one LoRA site
with chosen inputs and estimates the private map. Measures what PLL's error buys.

The client sends full-range integer inputs x_hat (it may send any encoding it likes), decrypts
the replies (it has the keys, so what it sees is exactly what the ``plain`` backend returns), and
fits the site's integer map ``P = A_hat^T B_hat^T`` by least squares, truncated to the rank r,
which the manifest reveals. The error is ``||P_hat - P||_F / ||P||_F``. "exact" means rounding
P_hat gives P entry for entry: full recovery of the server's integer weights.

For protocols that let the client decrypt the rank-r intermediate, the same fit recovers
``A_hat`` from ``z = x_hat A_hat^T + e1`` unmasked, and faces uniform noise when the server adds
its fresh mask t (docs/pll.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from privlora.backends.pll import PLLParams, QuantizedSite, SystemRandom, centred, masked_intermediate, quantize_site, respond


@dataclass(frozen=True)
class ExtractionResult:
    variant: str  # "reply", "intermediate-unmasked", "intermediate-masked"
    sigma: float
    queries: int
    relative_error: float
    exact: bool

    def to_json(self) -> dict:
        return asdict(self)


def demo_site(layer: int = 0, module: str = "v_proj") -> tuple[np.ndarray, np.ndarray, float, str]:
    """(lora_A, lora_B, scaling, name) of one site of the demo adapter (real trained weights)."""
    from privlora.paths import DEMO_ADAPTER
    from privlora.models.lora import read_adapter

    adapter = read_adapter(DEMO_ADAPTER)
    site = next(s for s in adapter.sites if s.module.endswith(f"layers.{layer}.self_attn.{module}"))
    return site.lora_A.double().numpy(), site.lora_B.double().numpy(), site.scaling, site.module


def _low_rank_fit(x: np.ndarray, y: np.ndarray, rank: int) -> np.ndarray:
    """Least-squares map from x to y, truncated to ``rank`` (the attacker knows r)."""
    fit, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    u, s, vt = np.linalg.svd(fit, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _score(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, bool]:
    error = float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))
    return error, bool(np.array_equal(np.rint(estimate), truth))


def extract(site: QuantizedSite, queries: int, variant: str, rng: np.random.Generator) -> tuple[float, bool]:
    """One attack: ``queries`` chosen inputs against one site, in one protocol variant."""
    x_max = 2 ** (site.params.x_bits - 1) - 1
    d_in = site.a_hat.shape[1]
    x_hat = rng.integers(-x_max, x_max + 1, size=(queries, d_in))
    source = SystemRandom()
    if variant == "reply":
        y = centred(respond(site, x_hat, source), site.modulus)
        return _score(_low_rank_fit(x_hat, y, site.a_hat.shape[0]), site.a_hat.T @ site.b_hat.T)
    z, mask = masked_intermediate(site, x_hat, source)
    if variant == "intermediate-unmasked":
        z = (z - mask) % site.modulus  # the variant without t: what the client would decrypt
    return _score(_low_rank_fit(x_hat, centred(z, site.modulus), site.a_hat.shape[0]), site.a_hat.T.astype(np.float64))


def extract_bfv(lora_a: np.ndarray, lora_b: np.ndarray, scaling: float, sigma: float, queries: int,
                rng: np.random.Generator) -> dict[str, tuple[float, bool]]:
    """The same attack through the real ``bfv`` backend: a client with its own keys sends chosen
    full-range rows as message 0, decrypts ``h' = A_hat x_hat + t`` (variant ``bfv-intermediate``),
    sends it back as message 1 and decrypts ``y = B_hat A_hat x_hat + e`` (``bfv-reply``)."""
    from privlora.backends import bfv
    from privlora.backends.exchange import local_send
    from privlora.core.types import GroupSpec, PLLSite

    site = PLLSite(0, "attacked", lora_a.shape[1], lora_b.shape[0], lora_a.shape[0], scaling)
    group = GroupSpec("round_0", 0, 0, 0, (site,))
    build = bfv.compile([group], {0: (lora_a, lora_b)}, {"sigma": sigma})
    client = bfv.Client(build.client_params)
    server = bfv.Server(build.server_tensors, [group], {**build.public_params, "zero_pool": 0})
    send = local_send(server, group, server.open_session(client.evaluation_keys()))
    x_max = 2 ** (client.pll.x_bits - 1) - 1
    x_hat = rng.integers(-x_max, x_max + 1, size=(queries, site.d_in))
    first, exchange = client._layout(group, 0, queries), 1  # the attacker drives the protocol by hand
    masked = client._receive(first, send(0, client._send(first, np.mod(x_hat, client.modulus).astype(np.uint64),
                                                         exchange)))
    second = client._layout(group, 1, queries)
    y = centred(client._receive(second, send(1, client._send(second, masked, exchange))).astype(np.int64),
                client.modulus)
    a_hat, b_hat = (build.server_tensors[f"{group.key}.{name}"].astype(np.float64) for name in ("a_hat", "b_hat"))
    return {"bfv-reply": _score(_low_rank_fit(x_hat, y, site.rank), a_hat.T @ b_hat.T),
            "bfv-intermediate": _score(_low_rank_fit(x_hat, centred(masked.astype(np.int64), client.modulus),
                                                     site.rank), a_hat.T)}


def extraction_table(sigmas: list[float], query_counts: list[int], seed: int = 0,
                     through_bfv: bool = False) -> list[ExtractionResult]:
    lora_a, lora_b, scaling, _ = demo_site()
    rng = np.random.default_rng(seed)
    results = []
    for sigma in sigmas:
        site = quantize_site(lora_a, lora_b, scaling, PLLParams(sigma=sigma))
        for variant in ("reply", "intermediate-unmasked", "intermediate-masked"):
            for queries in query_counts:
                results.append(ExtractionResult(variant, sigma, queries, *extract(site, queries, variant, rng)))
        for queries in query_counts if through_bfv else []:
            for variant, outcome in extract_bfv(lora_a, lora_b, scaling, sigma, queries, rng).items():
                results.append(ExtractionResult(variant, sigma, queries, *outcome))
    return results


def quality_table(sigmas: list[float], questions: int = 3, tokens: int = 32) -> list[dict]:
    """Greedy agreement of the fine-tuned model through the ``plain`` backend at each sigma with
    the plaintext fine-tuned model, on the demo's held-out questions."""
    import tempfile

    from privlora.paths import DEMO_ADAPTER
    from privlora.compiler.driver import compile_artifact
    from privlora.models.loading import load_model
    from privlora.models.hf_tokenizer import encode_chat
    from privlora.tools.qa import load_qa
    from privlora.local import open_local
    from privlora.models.step import TorchStep
    from privlora.client.generation import GenerationConfig, generate

    tuned = load_model("smollm2", DEMO_ADAPTER)
    config = GenerationConfig(max_new_tokens=tokens, eos_token_ids=(tuned.tokenizer.eos_token_id,))
    prompts = [encode_chat(tuned.tokenizer, pair.question) for pair in load_qa(split="heldout")[:questions]]
    reference = [list(generate(TorchStep(tuned.model), prompt, config)) for prompt in prompts]
    rows = []
    for sigma in sigmas:
        with tempfile.TemporaryDirectory() as scratch:
            artifact = compile_artifact("smollm2", DEMO_ADAPTER, f"{scratch}/plain", backend="plain",
                                        backend_options={"sigma": sigma}).artifact
            model = open_local(artifact)
            outputs = [list(generate(model, prompt, config)) for prompt in prompts]
        compared = [(a == b) for want, got in zip(reference, outputs) for a, b in zip(want, got)]
        identical = sum(want == got for want, got in zip(reference, outputs))
        rows.append({"sigma": sigma, "token_agreement": sum(compared) / max(len(compared), 1),
                     "identical_answers": identical, "questions": len(prompts)})
    return rows


def render_extraction(results: list[ExtractionResult]) -> str:
    counts = sorted({r.queries for r in results})
    lines = ["variant                  sigma    " + "  ".join(f"{q:>12}" for q in counts)]
    keys = sorted({(r.variant, r.sigma) for r in results}, key=lambda k: (k[0], k[1]))
    for variant, sigma in keys:
        cells = []
        for q in counts:
            r = next(r for r in results if (r.variant, r.sigma, r.queries) == (variant, sigma, q))
            cells.append(f"{r.relative_error:>9.1e}{' ex' if r.exact else '   '}")
        lines.append(f"{variant:<24} {sigma:<8g} " + "  ".join(cells))
    return "\n".join(lines)


def render_svg(results: list[ExtractionResult], variant: str = "reply") -> str:
    """A log-log line chart (SVG, no plotting library) of error against queries, one line per sigma."""
    rows = [r for r in results if r.variant == variant]
    width, height, margin, legend = 720, 400, 60, 110  # legend: room for the labels on the right
    xs = sorted({r.queries for r in rows})
    low, high = -16.0, 1.0  # log10 of the relative error axis

    def px(queries: int) -> float:
        span = np.log2(xs[-1]) - np.log2(xs[0]) or 1.0
        return margin + (np.log2(queries) - np.log2(xs[0])) / span * (width - margin - legend)

    def py(error: float) -> float:
        value = min(max(np.log10(max(error, 1e-16)), low), high)
        return height - margin - (value - low) / (high - low) * (height - 2 * margin)

    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle">extraction of one site: relative error of the '
             f'recovered map ({variant})</text>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - legend}" y2="{height - margin}" stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">chosen queries (d_in = 576)</text>']
    for q in xs:
        parts.append(f'<text x="{px(q):.0f}" y="{height - margin + 16}" text-anchor="middle">{q}</text>')
    for exponent in range(int(low), int(high) + 1, 3):
        parts.append(f'<text x="{margin - 6}" y="{py(10.0**exponent) + 4:.0f}" text-anchor="end">1e{exponent}</text>')
    for color, sigma in zip(colors, sorted({r.sigma for r in rows})):
        line = sorted((r for r in rows if r.sigma == sigma), key=lambda r: r.queries)
        points = " ".join(f"{px(r.queries):.1f},{py(r.relative_error):.1f}" for r in line)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        label = line[-1]
        parts.append(f'<text x="{px(label.queries) + 4:.0f}" y="{py(label.relative_error):.0f}" fill="{color}">'
                     f'sigma {sigma:g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
