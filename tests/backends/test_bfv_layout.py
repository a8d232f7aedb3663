"""The bfv block packing on its own, without SEAL (its plaintext twin): a negacyclic polynomial
product of the packed input and weights, computed with numpy, holds ``x W^T`` at exactly the
layout's output coefficients, for every block shape the cost model may pick."""

from __future__ import annotations

import numpy as np
import pytest

from privlora.backends.bfv_layout import Layout, choose_layout

MODULUS = 1 << 20
rng = np.random.default_rng(3)


def negacyclic_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b in Z_p[X] / (X^N + 1)."""
    n = len(a)
    full = np.convolve(a.astype(object), b.astype(object))
    out = full[:n].copy()
    out[:len(full) - n] -= full[n:]
    return np.array([int(v) % MODULUS for v in out], dtype=np.uint64)


def packed_product(layout: Layout, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [rows, d_in] times w [d_out, d_in]^T through the layout's packing, read back with gather."""
    inputs, weights = layout.encode(x), layout.weights(w)
    sums = np.zeros((layout.row_blocks, layout.out_blocks, layout.degree), dtype=np.uint64)
    for i in range(layout.row_blocks):
        for m in range(layout.out_blocks):
            for j in range(layout.in_blocks):
                sums[i, m] = (sums[i, m] + negacyclic_product(inputs[i, j], weights[m, j])) % MODULUS
    return layout.gather(sums[..., layout.outputs])


@pytest.mark.parametrize("rows, d_in, d_out", [(1, 5, 3), (3, 7, 4), (2, 16, 9), (5, 3, 11)])
def test_the_packing_puts_every_inner_product_on_its_output_coefficient(rows: int, d_in: int, d_out: int):
    layout = choose_layout(rows, d_in, d_out, 64)
    assert layout.tb * layout.db * layout.ob <= layout.degree
    x = rng.integers(0, MODULUS, (rows, d_in), dtype=np.uint64)
    w = rng.integers(0, MODULUS, (d_out, d_in), dtype=np.uint64)
    expected = (x.astype(object) @ w.T.astype(object)) % MODULUS
    assert np.array_equal(packed_product(layout, x, w), expected.astype(np.uint64))


def test_a_forced_block_shape_still_packs_correctly_and_the_cost_model_prefers_fewer_ciphertexts():
    layout = Layout(rows=3, d_in=6, d_out=5, tb=1, db=2, ob=2, degree=64)  # many small blocks
    x = rng.integers(0, MODULUS, (3, 6), dtype=np.uint64)
    w = rng.integers(0, MODULUS, (5, 6), dtype=np.uint64)
    assert np.array_equal(packed_product(layout, x, w), ((x.astype(object) @ w.T.astype(object)) % MODULUS).astype(np.uint64))
    assert choose_layout(3, 6, 5, 64).cost < layout.cost


def test_scatter_writes_the_outputs_where_gather_reads_them():
    layout = choose_layout(4, 10, 6, 64)
    y = rng.integers(0, MODULUS, (4, 6), dtype=np.uint64)
    fill = rng.integers(0, MODULUS, (layout.row_blocks, layout.out_blocks, layout.degree), dtype=np.uint64)
    placed = layout.scatter(y, fill)
    assert np.array_equal(layout.gather(placed[..., layout.outputs]), y)
    untouched = np.delete(placed, layout.outputs, axis=-1)
    assert np.array_equal(untouched, np.delete(fill, layout.outputs, axis=-1))
