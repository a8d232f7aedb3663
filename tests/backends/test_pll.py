"""The PLL transform: exact decoding up to the error, the lift and the error measured over many
replies (each with a control that removes it), zero and extreme inputs, the masked
intermediate (exact unmasking; uniform, with a control that removes the mask), and compile-time
modulus errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privlora.backends.pll import (
    PLLError, PLLParams, SystemRandom, centred, decode, discrete_gaussian, encode_input, finish_masked,
    masked_intermediate, quantize_site, respond,
)

PARAMS = PLLParams()
CALLS = 400  # replies per statistical test: 25 per bin of a 16-bin histogram
UNIFORM = 6.0  # uniformity_score bound: a uniform sample exceeds it about once in 10^7


def random_site(seed: int, d_in: int, d_out: int, rank: int, params: PLLParams = PARAMS):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.05, (rank, d_in))
    b = rng.normal(0, 0.02, (d_out, rank))
    return a, b, quantize_site(a, b, 2.0, params)


def integer_lora(site, x_hat):
    return (x_hat @ site.a_hat.T) @ site.b_hat.T


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), d_in=st.integers(1, 48), d_out=st.integers(1, 40), rank=st.integers(1, 8),
       rows=st.integers(1, 4), magnitude=st.floats(1e-6, 1e6))
def test_decoding_recovers_the_integer_lora_up_to_the_error(seed, d_in, d_out, rank, rows, magnitude):
    _, _, site = random_site(seed, d_in, d_out, rank)
    x = np.random.default_rng(seed + 1).normal(0, magnitude, (rows, d_in))
    x_hat, _ = encode_input(x, PARAMS.x_bits)
    y = respond(site, x_hat, np.random.default_rng(seed + 2))
    difference = centred(y, site.modulus) - integer_lora(site, x_hat)
    assert np.abs(difference).max() <= PARAMS.error_bound


def uniformity_score(samples: np.ndarray, span: int, bins: int = 16) -> float:
    """How far each column of ``samples`` ([calls, components], values in [0, span), span a power
    of two) is from uniform over the calls, in standard deviations of Pearson's chi-square
    statistic pooled over the columns (about 0 when uniform). It bins the top bits: a small
    error spreads the low bits of any value, so only the high bits tell a mask or a lift from none."""
    counts = np.stack([np.bincount(column * bins // span, minlength=bins) for column in samples.T])
    expected = samples.shape[0] / bins
    dof = samples.shape[1] * (bins - 1)
    return float((((counts - expected) ** 2 / expected).sum() - dof) / np.sqrt(2 * dof))


def error_and_lift(params: PLLParams) -> tuple[np.ndarray, np.ndarray]:
    """e and k of CALLS replies ([calls, components]) on one known input: y - exact = e + k q,
    and |e| < q / 2, so the centred residue is e and the rest is k q."""
    _, _, site = random_site(0, 32, 24, 8, params)
    x_hat, _ = encode_input(np.random.default_rng(1).normal(size=(3, 32)), params.x_bits)
    offsets = np.stack([(respond(site, x_hat) - integer_lora(site, x_hat)).ravel() for _ in range(CALLS)])
    error = centred(offsets, site.modulus)
    return error, (offsets - error) // site.modulus


@pytest.mark.parametrize("params, lifted, flooded", [(PARAMS, True, True), (PLLParams(lift_bits=0), False, True),
                                                     (PLLParams(sigma=0.0), True, False)],
                         ids=["lift and error", "control: lift_bits 0", "control: sigma 0"])
def test_the_lift_is_uniform_and_the_error_is_bounded_with_the_configured_spread(params, lifted, flooded):
    error, lift = error_and_lift(params)  # the OS CSPRNG, as in production
    assert np.abs(error).max() <= params.error_bound
    assert lift.min() >= 0 and lift.max() < 2**params.lift_bits
    score = uniformity_score(lift, 2**params.lift_bits)
    assert (score < UNIFORM) if lifted else (score > 100 * UNIFORM), f"lift uniformity score {score:.1f}"
    ratio = np.sqrt(error.var(axis=0).mean()) / PARAMS.sigma  # over the calls: e is fresh per call
    assert (0.95 < ratio < 1.05) if flooded else (ratio == 0.0), f"estimated / configured sigma {ratio:.3f}"


def test_decoded_delta_approximates_the_float_lora():
    a, b, site = random_site(3, 64, 48, 8)
    x = np.random.default_rng(4).normal(size=(5, 64))
    x_hat, c = encode_input(x, PARAMS.x_bits)
    delta = decode(respond(site, x_hat), site.modulus, c, site.out_scale)
    exact = 2.0 * (x @ a.T) @ b.T
    assert np.linalg.norm(delta - exact) / np.linalg.norm(exact) < 0.05


def test_zero_and_extreme_inputs():
    a, b, site = random_site(5, 16, 12, 4)
    zero = np.zeros((2, 16))
    x_hat, c = encode_input(zero, PARAMS.x_bits)
    assert np.all(x_hat == 0) and np.all(c == 1.0)
    assert np.abs(decode(respond(site, x_hat), site.modulus, c, site.out_scale)).max() <= PARAMS.error_bound * site.out_scale.max()
    extreme = np.tile([1e30, -1e30], (3, 8))
    x_hat, c = encode_input(extreme, PARAMS.x_bits)
    assert np.abs(x_hat).max() == 2 ** (PARAMS.x_bits - 1) - 1
    delta = decode(respond(site, x_hat), site.modulus, c, site.out_scale)
    exact = 2.0 * (extreme @ a.T) @ b.T
    assert np.linalg.norm(delta - exact) / np.linalg.norm(exact) < 0.05  # no wrap-around at the edges


def test_masked_intermediate_unmasks_exactly():
    _, _, site = random_site(6, 40, 30, 8)
    x_hat, _ = encode_input(np.random.default_rng(7).normal(size=(2, 40)), PARAMS.x_bits)
    z, mask = masked_intermediate(site, x_hat)
    assert z.shape == (2, 8) and np.all((0 <= z) & (z < site.modulus))
    inner_exact = x_hat @ site.a_hat.T
    assert np.abs(centred(z - mask, site.modulus) - inner_exact).max() <= PARAMS.error_bound
    y = finish_masked(site, z, mask)
    bound = PARAMS.error_bound * (np.abs(site.b_hat).sum(axis=1).max() + 1)
    assert np.abs(centred(y, site.modulus) - inner_exact @ site.b_hat.T).max() <= bound


class ZeroMask(SystemRandom):
    """Test-only control: the OS CSPRNG, except that ``integers`` (in masked_intermediate, the
    mask t and nothing else) draws zeros."""

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.zeros(size, dtype=np.int64)


@pytest.mark.parametrize("rng, masked", [(SystemRandom(), True), (ZeroMask(), False)], ids=["mask", "control: no mask"])
def test_the_masked_intermediate_is_uniform_on_a_fixed_input(rng, masked):
    _, _, site = random_site(6, 40, 30, 8)
    x_hat, _ = encode_input(np.random.default_rng(7).normal(size=(2, 40)), PARAMS.x_bits)
    z = np.stack([masked_intermediate(site, x_hat, rng)[0].ravel() for _ in range(CALLS)])
    score = uniformity_score(z, site.modulus)
    assert (score < UNIFORM) if masked else (score > 100 * UNIFORM), f"mask uniformity score {score:.1f}"


def test_an_accumulator_that_does_not_fit_is_a_compile_time_error():
    with pytest.raises(PLLError, match="needs a .*-bit modulus"):
        random_site(8, 4096, 64, 8, PLLParams(max_modulus_bits=20))


def test_discrete_gaussian_has_the_requested_spread():
    samples = discrete_gaussian(SystemRandom(), 3.2, 39, 20000)
    assert np.abs(samples).max() <= 39
    assert abs(samples.mean()) < 0.15 and abs(samples.std() - 3.2) < 0.15
    wide = discrete_gaussian(SystemRandom(), 1e6, 12_000_000, 20000)  # the rounded-continuous branch
    assert wide.dtype == np.int64 and np.abs(wide).max() <= 12_000_000
    assert abs(wide.mean()) < 0.03e6 and abs(wide.std() - 1e6) < 0.03e6


def test_system_random_is_uniform_without_bias():
    values = SystemRandom().integers(0, 3, 30000)
    assert set(np.unique(values)) == {0, 1, 2}
    assert np.abs(np.bincount(values) / 30000 - 1 / 3).max() < 0.02
