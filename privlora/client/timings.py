"""Where a secure step's time and bytes went, and the reports ``generate`` prints and writes.

A step's private part has two phases for a backend with pads: the online exchange (``encrypt``,
``server``, ``decrypt``) and, when a step found its pads short, the offline work it did on the
spot (the cold path, ``offline_s``). Totals count every second the user waited, both phases."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from privlora.backends.exchange import ExchangeCost


@dataclass
class OfflineStats(ExchangeCost):
    """Pads made ahead of need (or on the spot): rows per group, time and bytes, all groups."""

    rows: float = 0

    @property
    def seconds(self) -> float:
        return self.encrypt_s + self.server_s + self.decrypt_s

    def add(self, rows: int, cost: ExchangeCost) -> None:
        self.rows += rows
        for name in ExchangeCost.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(cost, name))

    def report(self) -> dict[str, float]:
        return {"rows": self.rows, "seconds": self.seconds, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


@dataclass
class StepStats(ExchangeCost):
    """Where one step's time and bytes went: the public segments, every group's online exchange,
    and the pads this step had to make on the spot."""

    rows: float = 0  # token positions computed (the prompt length for a prefill, else 1)
    public_s: float = 0.0
    offline_s: float = 0.0  # pads made on the spot (the cold path)
    offline_rows: float = 0.0

    @property
    def online_s(self) -> float:
        return self.public_s + self.encrypt_s + self.server_s + self.decrypt_s

    @property
    def total_s(self) -> float:
        return self.online_s + self.offline_s


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def total_step(steps: list[StepStats]) -> StepStats:
    """The field-wise sum of several steps (rows included): one answer's whole cost."""
    return StepStats(**{name: sum(getattr(s, name) for s in steps) for name in StepStats.__dataclass_fields__})


def mean_step(steps: list[StepStats]) -> StepStats:
    """The field-wise mean of several steps (rows included)."""
    total = total_step(steps)
    return StepStats(**{name: getattr(total, name) / len(steps) for name in StepStats.__dataclass_fields__})


def offline_since(now: OfflineStats, before: OfflineStats) -> OfflineStats:
    """The pads made between two readings of a client's running total (:attr:`SecureClient.offline`)."""
    return OfflineStats(**{name: getattr(now, name) - getattr(before, name)
                           for name in OfflineStats.__dataclass_fields__})


def answer_report(steps: list[StepStats], offline: OfflineStats) -> dict[str, Any]:
    """One answer's privacy cost as JSON-ready numbers: its online phase (public segments and
    every group's exchange, what the user waits for with pads ready) and the pads made for it
    (``waited_s``: the part made on the spot, which the user waited for too)."""
    total = total_step(steps)
    return {"steps": len(steps),
            "online": {"seconds": total.online_s, "public_s": total.public_s, "bytes_up": total.bytes_up,
                       "bytes_down": total.bytes_down, "messages": total.messages},
            "offline": {**offline.report(), "waited_s": total.offline_s}}


def _online(steps: list[StepStats]) -> dict[str, float | None]:
    """The online phase alone: what a user with pads ready waits for."""
    decode = mean_step(steps[1:]) if len(steps) > 1 else None
    return {"prefill_s": steps[0].online_s if steps else None,
            "decode_tokens_per_s": 1.0 / decode.online_s if decode and decode.online_s else None,
            "bytes_per_token": decode.bytes_up + decode.bytes_down if decode else None,
            "messages_per_token": decode.messages if decode else None}


def timing_report(steps: list[StepStats], offline: OfflineStats | None = None) -> dict[str, Any]:
    """The prefill step and the mean decode step as JSON-ready numbers (``generate --stats-json``),
    the online phase apart, and every pad made in the session (zeros for per-query backends)."""
    decode = steps[1:]
    report: dict[str, Any] = {"prefill": {**asdict(steps[0]), "total_s": steps[0].total_s} if steps else None,
                              "decode": None, "decode_steps": len(decode), "tokens_per_second": None,
                              "online": _online(steps), "offline": (offline or OfflineStats()).report()}
    if decode:
        mean = mean_step(decode)
        report["decode"] = {**asdict(mean), "total_s": mean.total_s}
        report["tokens_per_second"] = 1.0 / mean.total_s if mean.total_s else None
    return report


def render_timings(steps: list[StepStats], offline: OfflineStats | None = None) -> str:
    """The prefill step, then the mean decode step: where the time and the bytes went."""
    if not steps:
        return "(no steps)"
    cold = any(s.offline_s for s in steps)
    rows = [("step", "tokens", "msgs", "public", "encrypt", "server", "decrypt", *(("pads now",) if cold else ()),
             "total", "up", "down")]

    def line(label: str, s: StepStats) -> tuple[str, ...]:
        return (label, f"{s.rows:g}", f"{s.messages:g}", f"{s.public_s:.3f} s", f"{s.encrypt_s:.3f} s",
                f"{s.server_s:.3f} s", f"{s.decrypt_s:.3f} s", *((f"{s.offline_s:.3f} s",) if cold else ()),
                f"{s.total_s:.3f} s", _mb(s.bytes_up), _mb(s.bytes_down))

    rows.append(line("prefill", steps[0]))
    decode = steps[1:]
    if decode:
        mean = mean_step(decode)
        rows.append(line(f"decode (mean of {len(decode)})", mean))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if decode:
        text.append(f"decode: {1.0 / mean.total_s:.2f} tokens/s, {_mb(mean.bytes_up + mean.bytes_down)} per token "
                    "on the wire")
    if offline is not None and offline.rows:
        text.append(f"pads: {offline.rows:g} rows per group made offline in {offline.seconds:.2f} s, "
                    f"{_mb(offline.bytes_up + offline.bytes_down)} on the wire")
    return "\n".join(text)
