"""A torch decoder as the runtime's step function.

The generation loop (``privlora.client.generation``) runs on numpy arrays so that a client
needs no torch. The plaintext models are torch modules; :class:`TorchStep` converts at the
boundary, so the same loop drives the plaintext model and the secure client.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchStep:
    """``logits, keys, values = step(input_ids, position_ids, attention_mask, past_keys, past_values)``
    on numpy arrays, computed by a torch model with the same signature."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 past_keys: np.ndarray, past_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        args = (torch.from_numpy(np.ascontiguousarray(a)) for a in
                (input_ids, position_ids, attention_mask, past_keys, past_values))
        logits, keys, values = self.model(*args)
        return logits.numpy(), keys.numpy(), values.numpy()

    def empty_cache(self, batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        keys, values = self.model.empty_cache(batch_size)
        return keys.numpy(), values.numpy()
