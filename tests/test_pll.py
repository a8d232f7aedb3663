"""The PLL transform: exact decoding up to the error, fresh randomness, exact lift removal,
zero and extreme inputs, the masked-intermediate variant, and compile-time modulus errors."""

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


def test_lift_is_removed_exactly_and_randomness_is_fresh():
    _, _, site = random_site(0, 32, 24, 8)
    x_hat, _ = encode_input(np.random.default_rng(1).normal(size=(3, 32)), PARAMS.x_bits)
    exact = integer_lora(site, x_hat)
    replies = [respond(site, x_hat) for _ in range(3)]  # the OS CSPRNG, as in production
    for reply in replies:
        error = centred(reply, site.modulus) - exact
        assert np.all((reply - exact - error) % site.modulus == 0)  # what remains is a multiple of q
        assert np.abs(reply).max() > site.modulus  # the lift is really applied
    assert not np.array_equal(replies[0], replies[1]) and not np.array_equal(replies[1], replies[2])
    errors = [centred(r, site.modulus) - exact for r in replies]
    assert not np.array_equal(errors[0], errors[1])  # fresh e, not only fresh k


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


def test_masked_intermediate_is_uniform_and_unmasks_exactly():
    _, _, site = random_site(6, 40, 30, 8)
    x_hat, _ = encode_input(np.random.default_rng(7).normal(size=(2, 40)), PARAMS.x_bits)
    z, mask = masked_intermediate(site, x_hat)
    assert z.shape == (2, 8) and np.all((0 <= z) & (z < site.modulus))
    inner_exact = x_hat @ site.a_hat.T
    assert np.abs(centred(z - mask, site.modulus) - inner_exact).max() <= PARAMS.error_bound
    y = finish_masked(site, z, mask)
    bound = PARAMS.error_bound * (np.abs(site.b_hat).sum(axis=1).max() + 1)
    assert np.abs(centred(y, site.modulus) - inner_exact @ site.b_hat.T).max() <= bound
    # Over many calls the masked vector's low bits are uniform (the unmasked one is not).
    samples = np.concatenate([masked_intermediate(site, x_hat)[0].ravel() for _ in range(400)])
    counts = np.bincount(samples % 16, minlength=16)
    assert counts.min() > 0.6 * counts.mean()


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
