"""What the server received for one LoRA group of one token, beside what the client holds: the
numbers of the group's first message as the server reads them, and the client's own activation
x. The chat page draws both, so that a user sees uniform noise where a backend hides x and x's
structure where it does not (``plain``, ``reference``). Taken from the real message each answer
sent, never made up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privlora.backends.common import WireValues, wire_values
from privlora.core.types import GroupSpec

STRIP_VALUES = 64  # the first values of each, drawn as a strip of cells
HISTOGRAM_BINS = 16


@dataclass(frozen=True)
class Sent:
    """A group's first message as it left, and the row of x it carries last (the newest token)."""

    group: GroupSpec
    x: np.ndarray
    request: bytes
    rows: int


def _histogram(values: np.ndarray, low: float, high: float) -> list[float]:
    """Shares of the values in equal bins over ``[low, high)``."""
    counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=HISTOGRAM_BINS, range=(low, high))
    return (counts / max(len(values), 1)).round(4).tolist()


def _strip(values: np.ndarray, low: float, high: float) -> list[float]:
    """The first values, each placed in [0, 1] within ``[low, high)``."""
    first = np.asarray(values[:STRIP_VALUES], dtype=np.float64)
    return ((first - low) / (high - low)).clip(0.0, 1.0).round(4).tolist()


def server_view(client: Any, sent: Sent) -> dict[str, Any]:
    """The picture's data: the received message's values and the client's x, each as a strip of
    its first values and a histogram over its own range."""
    wire: WireValues = wire_values(client, sent.group, sent.request)
    bound = float(np.abs(sent.x).max(initial=0.0)) or 1.0
    return {"group": sent.group.key, "sites": [site.module for site in sent.group.sites], "rows": sent.rows, "message_bytes": len(sent.request),
            "received": {"meaning": wire.meaning, "count": int(wire.values.size), "low": wire.low, "high": wire.high,
                         "strip": _strip(wire.values, wire.low, wire.high),
                         "histogram": _histogram(wire.values, wire.low, wire.high)},
            "activation": {"meaning": "your activation x (the newest token's row)",
                           "count": int(sent.x.size), "low": -bound, "high": bound,
                           "strip": _strip(sent.x, -bound, bound), "histogram": _histogram(sent.x, -bound, bound)}}
