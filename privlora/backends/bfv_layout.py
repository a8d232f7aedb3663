"""How ``bfv`` packs a matrix product into ring elements by coefficient encoding (the technique
of Cheetah): the block layout, the cost model that picks it, and the packing of inputs, weights
and outputs. Pure numpy, testable without SEAL."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from privlora.backends.pll import PLLError
from privlora.core.types import GroupSpec

# Cost model of one block choice, in milliseconds measured on this 2-core CPU: about 1 ms per
# ciphertext (encrypt or re-randomise, serialise, parse, NTT) and 0.05 ms per product.
CIPHERTEXT_MS, PRODUCT_MS = 1.0, 0.05


@dataclass(frozen=True)
class Layout:
    """How a ``[rows, d_in] x [d_in, d_out]`` product sits in ring elements of ``degree`` coefficients:
    input (r, j) of a block at coefficient ``r db ob + j``, weight (o, j) at ``o db + db - 1 - j``,
    so output (r, o) is coefficient ``r db ob + o db + db - 1`` of the product."""

    rows: int
    d_in: int
    d_out: int
    tb: int
    db: int
    ob: int
    degree: int

    @property
    def row_blocks(self) -> int:
        return math.ceil(self.rows / self.tb)

    @property
    def in_blocks(self) -> int:
        return math.ceil(self.d_in / self.db)

    @property
    def out_blocks(self) -> int:
        return math.ceil(self.d_out / self.ob)

    @property
    def input_ciphertexts(self) -> int:
        return self.row_blocks * self.in_blocks

    @property
    def output_ciphertexts(self) -> int:
        return self.row_blocks * self.out_blocks

    @property
    def cost(self) -> float:
        products = self.row_blocks * self.in_blocks * self.out_blocks
        return CIPHERTEXT_MS * (self.input_ciphertexts + self.output_ciphertexts) + PRODUCT_MS * products

    @functools.cached_property
    def outputs(self) -> list[int]:
        """Coefficient indices of the outputs of one ciphertext, row-major over (r, o)."""
        r, o = np.meshgrid(np.arange(self.tb), np.arange(self.ob), indexing="ij")
        return (r * self.db * self.ob + o * self.db + self.db - 1).reshape(-1).tolist()

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Input polynomials ``[row_blocks, in_blocks, degree]`` of ``x`` ``[rows, d_in]`` (uint64)."""
        blocks = np.zeros((self.row_blocks * self.tb, self.in_blocks * self.db), dtype=np.uint64)
        blocks[:self.rows, :self.d_in] = x
        blocks = blocks.reshape(self.row_blocks, self.tb, self.in_blocks, self.db).transpose(0, 2, 1, 3)
        polys = np.zeros((self.row_blocks, self.in_blocks, self.tb, self.db * self.ob), dtype=np.uint64)
        polys[..., :self.db] = blocks
        return self._to_degree(polys.reshape(self.row_blocks, self.in_blocks, self.tb * self.db * self.ob))

    def weights(self, w: np.ndarray) -> np.ndarray:
        """Weight polynomials ``[out_blocks, in_blocks, degree]`` of ``w`` ``[d_out, d_in]`` (uint64 mod p)."""
        blocks = np.zeros((self.out_blocks * self.ob, self.in_blocks * self.db), dtype=np.uint64)
        blocks[:self.d_out, :self.d_in] = w
        blocks = blocks.reshape(self.out_blocks, self.ob, self.in_blocks, self.db).transpose(0, 2, 1, 3)
        return self._to_degree(blocks[..., ::-1].reshape(self.out_blocks, self.in_blocks, -1))

    def gather(self, values: np.ndarray) -> np.ndarray:
        """``[rows, d_out]`` from the output coefficients ``[row_blocks, out_blocks, tb * ob]``."""
        blocks = values.reshape(self.row_blocks, self.out_blocks, self.tb, self.ob).transpose(0, 2, 1, 3)
        return blocks.reshape(self.row_blocks * self.tb, self.out_blocks * self.ob)[:self.rows, :self.d_out]

    def scatter(self, y: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """``fill`` ``[row_blocks, out_blocks, degree]`` with ``y`` ``[rows, d_out]`` at the output coefficients."""
        blocks = np.zeros((self.row_blocks * self.tb, self.out_blocks * self.ob), dtype=np.uint64)
        blocks[:self.rows, :self.d_out] = y
        blocks = blocks.reshape(self.row_blocks, self.tb, self.out_blocks, self.ob).transpose(0, 2, 1, 3)
        out = fill.copy()
        out[..., self.outputs] = blocks.reshape(self.row_blocks, self.out_blocks, self.tb * self.ob)
        return out

    def _to_degree(self, polys: np.ndarray) -> np.ndarray:
        out = np.zeros((*polys.shape[:-1], self.degree), dtype=np.uint64)
        out[..., :polys.shape[-1]] = polys
        return out


def _splits(n: int) -> list[int]:
    """Block sizes worth trying for a dimension of n: ceil(n / k) for every k."""
    return sorted({math.ceil(n / k) for k in range(1, n + 1)})


@functools.lru_cache(maxsize=256)
def choose_layout(rows: int, d_in: int, d_out: int, degree: int) -> Layout:
    """The cheapest block (tb, db, ob) with ``tb db ob <= degree`` under the cost model."""
    best: Layout | None = None
    for tb in _splits(max(rows, 1)):
        for db in _splits(d_in):
            room = degree // (tb * db)
            if room == 0:
                continue
            ob = math.ceil(d_out / math.ceil(d_out / room))  # the fewest output blocks, balanced
            layout = Layout(rows, d_in, d_out, tb, db, ob, degree)
            if best is None or layout.cost < best.cost:
                best = layout
    if best is None:
        raise PLLError(f"no BFV layout for {rows} x {d_in} -> {d_out} in {degree} coefficients")
    return best


def message_layout(group: GroupSpec, message: int, rows: int, degree: int) -> Layout:
    """The block layout of a group's message: x [rows, d_in] -> rank, then h' [rows, rank] -> d_out."""
    d_in, d_out = (group.d_in, group.rank) if message == 0 else (group.rank, group.d_out)
    return choose_layout(rows, d_in, d_out, degree)
