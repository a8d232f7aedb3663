"""``concrete`` backend: the PLL integer protocol under TFHE with concrete-python (the compiler
that Concrete ML is built on).

Concrete ML compiles a model *with its weights as constants*, one circuit and one key set per
model, so 30 layers would mean 30 key sets; it has no clear run-time inputs. We therefore drop to
concrete-python: one ``fhe.module`` holds one function per distinct group shape,

    y = (x_hat @ A_hat^T) @ B_hat^T + n        x_hat encrypted; A_hat^T, B_hat^T, n clear, from the server

so every layer shares one key set, and the weights are inputs at run time, never in the client
bundle. The PLL randomness ``n = e + k q`` is a clear input added inside the encrypted
computation. The encrypted integers are exactly log2(q) bits wide (forced with ``fhe.hint``), so
the arithmetic is natively mod q; k in {0, 1} hides the ciphertext's extra padding bit.

Known limit, measured: there is no bootstrap in this circuit and concrete-python offers no
re-randomisation, so a reply is a linear function of the client's own input ciphertexts. A
client that keeps its ciphertexts can solve for ``A_hat^T B_hat^T`` and ``n`` exactly. This
backend protects the prompt, not the adapter (see docs/security.md).

Workarounds for concrete-python 2.10: transposing a clear input inside the function fails to
lower (A and B are passed transposed); the default composable module is rejected (NotComposable).
"""

from __future__ import annotations

import atexit
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from privlora.backends.base import BackendBuild, GroupSpec, PayloadError, PendingStore, Request, Weights
from privlora.backends.signals import kept_signal_handlers
from privlora.backends.common import OneMessage, block_diagonal, check_message, delta_of, frame, rows_of, unframe
from privlora.backends.pll import (PLLError, PLLParams, SystemRandom, centred, decode, discrete_gaussian,
                                   encode_input, pll_params, quantize_group)

NAME = "concrete"
# the only top-level keys client_params (client/crypto.json) may have; tests/compiler/test_leakscan.py checks
CLIENT_PARAMS: frozenset[str] = frozenset({"backend", "pll", "functions", "groups", "client_specs"})
DEFAULTS = {"x_bits": 8, "w_bits": 6, "max_modulus_bits": 38}  # 38: the widest that compiles at 576 -> 768


def _fhe():
    with kept_signal_handlers():  # its import replaces the process's signal handlers (backends/signals.py)
        from concrete import compiler, fhe  # imported on use: it loads the whole compiler

    # Its import also registers an atexit callback that stops the dataflow runtime with the C
    # library's exit(0) once a circuit has run, so the process ended with status 0 whatever it
    # was exiting with: a failed command or test run reported success. No circuit here uses the
    # dataflow runtime; the process ends as Python says.
    atexit.unregister(compiler._terminate_df_parallelization)
    return fhe


@dataclasses.dataclass(frozen=True)
class Shape:
    d_in: int
    rank: int
    d_out: int
    bits: int  # log2 q

    @property
    def function(self) -> str:
        return f"pll_{self.d_in}_{self.rank}_{self.d_out}_{self.bits}"


def _group_matrices(group: GroupSpec, weights, params: PLLParams) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """A_hat^T [d_in, rank] and block-diagonal B_hat^T [rank, d_out], q and the output scales."""
    sites = quantize_group(group, weights, params)
    a_t = np.concatenate([s.a_hat for s in sites]).T
    b_t = block_diagonal([s.b_hat.T for s in sites])
    return np.ascontiguousarray(a_t), b_t, sites[0].modulus, np.concatenate([s.out_scale for s in sites])


def _inputset(shape: Shape, params: PLLParams) -> list[tuple[np.ndarray, ...]]:
    """Samples that give each clear input its full signed range (the optimizer sizes noise from
    the clear types' widths) while the encrypted values stay small; ``fhe.hint`` then fixes their
    width at log2 q whatever the sample values."""
    x_max, w_max = 2 ** (params.x_bits - 1) - 1, 2 ** (params.w_bits - 1) - 1

    def sample(x_peak: int, a_peak: int, b_peak: int) -> tuple[np.ndarray, ...]:
        x = np.zeros(shape.d_in, np.int64)
        a = np.zeros((shape.d_in, shape.rank), np.int64)
        b = np.zeros((shape.rank, shape.d_out), np.int64)
        n = np.zeros(shape.d_out, np.int64)
        x[0], x[-1] = x_peak, -x_peak
        a[0, 0], a[-1, -1] = a_peak, -a_peak
        b[0, 0], b[-1, -1] = b_peak, -b_peak
        n[0], n[-1] = 2 ** (shape.bits - 2), -(2 ** (shape.bits - 2))
        return x, a, b, n

    samples = [sample(x_max, 1, 1), sample(1, w_max, 1), sample(1, 1, w_max)]
    return samples + [(-x, a, b, -n) for x, a, b, n in samples]


def _pll_function(shape: Shape):
    fhe = _fhe()

    def pll(x, a_t, b_t, n):
        return fhe.hint((x @ a_t) @ b_t + n, bit_width=shape.bits)

    pll.__name__ = pll.__qualname__ = shape.function  # the module's function name
    return pll


def _module(shapes: list[Shape], params: PLLParams):
    fhe = _fhe()
    from concrete.fhe.compilation.configuration import SecurityLevel

    functions: dict[str, Any] = {"composition": fhe.NotComposable()}
    for shape in shapes:
        functions[shape.function] = fhe.function({"x": "encrypted", "a_t": "clear", "b_t": "clear", "n": "clear"})(
            _pll_function(shape))
    module_class = fhe.module()(type("PLLModule", (), functions))
    configuration = fhe.Configuration(show_progress=False, verbose=False, loop_parallelize=False,
                                      dataflow_parallelize=False, auto_parallelize=False,
                                      security_level=SecurityLevel.SECURITY_128_BITS,
                                      compress_input_ciphertexts=True)
    try:
        with kept_signal_handlers():
            return module_class.compile({s.function: _inputset(s, params) for s in shapes}, configuration=configuration)
    except RuntimeError as exc:
        raise PLLError(f"Concrete found no TFHE parameters for shapes {[s.function for s in shapes]} ({exc}); "
                       "lower w_bits or x_bits") from None


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    params = pll_params({**DEFAULTS, **options}, NAME)
    tensors: dict[str, np.ndarray] = {}
    client_groups: dict[str, Any] = {}
    shapes: dict[str, Shape] = {}
    for group in groups:
        a_t, b_t, modulus, out_scale = _group_matrices(group, weights, params)
        shape = Shape(group.d_in, a_t.shape[1], group.d_out, modulus.bit_length() - 1)
        shapes[shape.function] = shape
        tensors[f"{group.key}.a_t"], tensors[f"{group.key}.b_t"] = a_t, b_t
        client_groups[group.key] = {"function": shape.function, "modulus": modulus, "out_scale": out_scale.tolist()}
    module = _module(list(shapes.values()), params)
    with tempfile.TemporaryDirectory() as scratch:
        module.server.save(str(Path(scratch) / "server.zip"))
        tensors["concrete.server"] = np.frombuffer((Path(scratch) / "server.zip").read_bytes(), dtype=np.uint8)
    public = {"pll": dataclasses.asdict(params), "functions": {k: dataclasses.asdict(s) for k, s in shapes.items()},
              "groups": {key: g["function"] for key, g in client_groups.items()}}
    specs = module.server.client_specs.serialize()
    return BackendBuild(tensors, {"backend": NAME, **public, "client_specs": specs.decode(), "groups": client_groups},
                        public)


class Client(OneMessage):
    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        fhe = _fhe()
        self.params = PLLParams(**params["pll"])
        self.groups = params["groups"]
        self.client = fhe.Client(fhe.ClientSpecs.deserialize(params["client_specs"].encode()))
        with kept_signal_handlers():
            if secret_key is None:
                self.client.keygen()
            else:
                self.client.keys.load_from_bytes(secret_key)

    def secret_key(self) -> bytes:
        return self.client.keys.serialize()

    def evaluation_keys(self) -> bytes:
        return self.client.evaluation_keys.serialize()

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, tuple[np.ndarray, tuple[int, ...]]]:
        rows, leading = rows_of(x, group.d_in)
        x_hat, scale = encode_input(rows, self.params.x_bits)
        scale = np.where(np.abs(x_hat).max(axis=1, initial=0) > 0, scale, 0.0)  # a zero row decodes to 0
        function = self.groups[group.key]["function"]
        with kept_signal_handlers():
            blobs = [self.client.encrypt(row, None, None, None, function_name=function)[0].serialize() for row in x_hat]
        return frame(blobs), (scale, leading)

    def decrypt(self, group: GroupSpec, reply: bytes, state: tuple[np.ndarray, tuple[int, ...]]) -> np.ndarray:
        fhe = _fhe()
        scale, leading = state
        spec = self.groups[group.key]
        rows = []
        for blob in unframe(reply, len(scale)):
            try:
                with kept_signal_handlers():
                    rows.append(np.asarray(self.client.decrypt(fhe.Value.deserialize(blob),
                                                               function_name=spec["function"])))
            except RuntimeError as exc:
                raise PayloadError(f"malformed reply ciphertext: {exc}") from None
        y = np.stack(rows).reshape(len(scale), group.d_out) if rows else np.zeros((0, group.d_out), np.int64)
        delta = decode(centred(y.astype(np.int64), int(spec["modulus"])), int(spec["modulus"]), scale,
                       np.asarray(spec["out_scale"]))
        return delta_of(delta, leading, group.d_out)


class Server(OneMessage):
    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        fhe = _fhe()
        self.params = PLLParams(**params["pll"])
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "server.zip"
            path.write_bytes(tensors["concrete.server"].tobytes())
            self.server = fhe.Server.load(str(path))
        shapes = {name: Shape(**spec) for name, spec in params["functions"].items()}
        self.groups = {group.key: (shapes[params["groups"][group.key]], tensors[f"{group.key}.a_t"].astype(np.int64),
                                   tensors[f"{group.key}.b_t"].astype(np.int64)) for group in groups}
        self.rng = SystemRandom()

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None):
        fhe = _fhe()
        try:
            return fhe.EvaluationKeys.deserialize(evaluation_keys)
        except RuntimeError as exc:
            raise PayloadError(f"malformed evaluation keys: {exc}") from None

    def _noise(self, shape: Shape) -> np.ndarray:
        """e + k q with k in {0, 1}: the reply is mod 2q in the ciphertext (padding bit)."""
        error = discrete_gaussian(self.rng, self.params.sigma, self.params.error_bound, shape.d_out)
        return error + self.rng.integers(0, 2, shape.d_out) * 2**shape.bits

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        check_message(message, self.messages)
        fhe = _fhe()
        values = []
        for blob in unframe(payload):
            try:
                values.append(fhe.Value.deserialize(blob))
            except (RuntimeError, ValueError) as exc:
                raise PayloadError(f"malformed input ciphertext: {exc}") from None
        return Request(message, len(values), values)

    def evaluate(self, group: GroupSpec, request: Request, session) -> bytes:
        shape, a_t, b_t = self.groups[group.key]
        replies = []
        for value in request.data:
            try:
                with kept_signal_handlers():  # the runtime's first run installs its own (backends/signals.py)
                    result = self.server.run(value, a_t, b_t, self._noise(shape), evaluation_keys=session,
                                             function_name=shape.function)
            except (RuntimeError, ValueError) as exc:
                raise PayloadError(f"malformed input ciphertext: {exc}") from None
            replies.append(result.serialize())
        return frame(replies)
