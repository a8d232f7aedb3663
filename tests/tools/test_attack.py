"""The extraction harness measures what it claims: a client with its own keys recovers a site's
integer map exactly from d_in chosen queries without PLL error, cannot from the masked
intermediate, and only approximately once the error is large."""

from __future__ import annotations

import numpy as np

from privlora.tools.attack import ExtractionResult, extract, extract_bfv, render_extraction, render_svg
from privlora.backends.pll import PLLParams, quantize_site


def site(sigma):
    rng = np.random.default_rng(3)
    return quantize_site(rng.normal(0, 0.1, (4, 32)), rng.normal(0, 0.1, (24, 4)), 2.0, PLLParams(sigma=sigma))


def test_exact_recovery_without_error_needs_d_in_queries():
    rng = np.random.default_rng(0)
    error, exact = extract(site(0.0), 32, "reply", rng)
    assert exact and error < 1e-9
    error, exact = extract(site(0.0), 16, "reply", rng)  # fewer queries than inputs: underdetermined
    assert not exact and error > 0.1


def test_the_mask_hides_the_intermediate_and_large_error_blocks_exact_recovery():
    rng = np.random.default_rng(1)
    assert extract(site(0.0), 64, "intermediate-unmasked", rng)[1]
    error, exact = extract(site(0.0), 64, "intermediate-masked", rng)
    assert not exact and error > 1.0
    error, exact = extract(site(1e5), 32, "reply", rng)
    assert not exact and error > 1e-3


def test_the_attack_through_the_real_bfv_backend():
    """Through real encryption and both messages: the reply gives the map exactly from d_in chosen
    rows at the default sigma (the query budget is the defence), half as many do not suffice
    (control), and the masked intermediate gives nothing."""
    rng = np.random.default_rng(2)
    weights = np.random.default_rng(3)
    lora_a, lora_b = weights.normal(0, 0.1, (4, 32)), weights.normal(0, 0.1, (24, 4))
    enough = extract_bfv(lora_a, lora_b, 2.0, 3.2, 64, rng)
    assert enough["bfv-reply"][1] and enough["bfv-reply"][0] < 1e-6
    assert not enough["bfv-intermediate"][1] and enough["bfv-intermediate"][0] > 1.0
    too_few = extract_bfv(lora_a, lora_b, 2.0, 3.2, 16, rng)
    assert not too_few["bfv-reply"][1] and too_few["bfv-reply"][0] > 0.1


def test_render():
    results = [ExtractionResult("reply", sigma, q, 10.0 ** -q, False) for sigma in (0.0, 3.2) for q in (2, 4)]
    table = render_extraction(results)
    assert "reply" in table and "1.0e-04" in table
    svg = render_svg(results)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "sigma 3.2" in svg
