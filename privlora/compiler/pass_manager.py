"""The pass contract: what each pass needs and provides, the analyses it records, and the manager
that runs passes in order with instruments around them.

A pass is a function ``(GraphModule, Analyses) -> GraphModule`` wrapped by :func:`compiler_pass`,
which attaches its :class:`PassInfo` (like TVM's PassInfo, or torch.fx's PassBase with its
``requires`` and ``ensures``). ``requires`` and ``provides`` name fields of :class:`Analyses`:
each field is one IR property together with the analysis that a pass records when it
establishes the property (``schedule``: every PLL node has a round and every public node a
stage; the record is the round schedule). Before each pass the manager checks that an earlier
pass, or the caller's input, provided everything the pass requires. After it, the manager lints
the graph and checks that the pass recorded what it provides. Instruments (IR dumps, numeric
checks: ``instruments.py``) observe every pass without being part of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from torch.fx import GraphModule

from privlora.core.plan import Plan
from privlora.core.types import PLLSite
from privlora.errors import PrivloraError

PROVIDER = "provided_by"  # Analyses field metadata: the default pipeline's pass that records it


class CompileError(PrivloraError):
    """The model cannot be compiled as asked (e.g. a private weight would leak)."""


@dataclass(frozen=True)
class PrivacyCounts:
    """How many nodes annotate_privacy tagged public and private."""

    public: int
    private: int


@dataclass(frozen=True)
class RoundSchedule:
    """The client<->server rounds of one step: ``members[r]`` are the targets of round r's PLL
    nodes, which the client may send together because none depends on another."""

    members: tuple[tuple[str, ...], ...]

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def pll_nodes_per_round(self) -> list[int]:
        return [len(targets) for targets in self.members]

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``schedule`` entry."""
        return {"count": self.count, "pll_nodes_per_round": self.pll_nodes_per_round,
                "members": [list(targets) for targets in self.members]}


def _analysis(provider: str) -> Any:
    """An Analyses field that stays absent until a pass records it, so reading it early fails
    loudly instead of returning a placeholder."""
    return field(init=False, repr=False, compare=False, metadata={PROVIDER: provider})


@dataclass
class Analyses:
    """What the passes have established about the graph, one typed field per IR property.

    A field exists only once a pass (or the caller, for an input graph) has set it; reading an
    absent one raises :class:`MissingAnalysisError`. ``name in analyses`` tells whether it exists.
    """

    # Every node is tagged public or private, and no public node reads an adapter weight.
    privacy: PrivacyCounts = _analysis("annotate_privacy")
    # Every LoRA site is a public base Linear plus a PLL node; the sites in graph order.
    sites: list[PLLSite] = _analysis("lora_to_pll")
    # PLL nodes reading the same tensor are one node; the size of each group, in graph order.
    fused_groups: list[int] = _analysis("fuse_pll")
    # Every PLL node has a round and every public node a stage; the rounds.
    schedule: RoundSchedule = _analysis("schedule_rounds")
    # The graph is cut into public segments and rounds; the execution plan over them.
    plan: Plan = _analysis("partition")

    def __getattr__(self, name: str) -> Any:
        """Python calls this only for attributes that are not set: an analysis not provided yet."""
        if name in PROVIDERS:
            raise MissingAnalysisError(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __contains__(self, name: str) -> bool:
        return name in vars(self)


PROVIDERS: dict[str, str] = {f.name: f.metadata[PROVIDER] for f in fields(Analyses)}


class MissingAnalysisError(CompileError):
    """A pass (or a caller) needs an analysis that no earlier pass provided."""

    def __init__(self, analysis: str, needed_by: str | None = None) -> None:
        self.analysis, self.needed_by = analysis, needed_by
        hint = f"run {PROVIDERS[analysis]} first"
        if needed_by is None:
            super().__init__(f"{analysis!r} was read before any pass provided it ({hint})")
        else:
            super().__init__(f"pass {needed_by} requires {analysis!r}, which no earlier pass provided ({hint})")


@dataclass(frozen=True)
class PassInfo:
    """A pass's name and contract: the analyses it needs before it runs and records when it ends."""

    name: str
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


PassFunction = Callable[[GraphModule, Analyses], GraphModule]


@dataclass(frozen=True)
class Pass:
    info: PassInfo
    run: PassFunction


def _known(names: Iterable[str]) -> frozenset[str]:
    """The names as a set, after checking each is an Analyses field (a typo fails at import)."""
    known = frozenset(names)
    unknown = sorted(known - PROVIDERS.keys())
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; the analyses are {list(PROVIDERS)}")
    return known


def compiler_pass(*, requires: Iterable[str] = (), provides: Iterable[str] = ()) -> Callable[[PassFunction], Pass]:
    """Declare a function a pass named after it, with its contract."""
    needs, gives = _known(requires), _known(provides)

    def wrap(function: PassFunction) -> Pass:
        return Pass(PassInfo(function.__name__, needs, gives), function)
    return wrap


@dataclass(frozen=True)
class PassRun:
    """One finished pass as instruments see it: its 1-based position, contract and run time."""

    number: int
    info: PassInfo
    seconds: float


class Instrument:
    """Observes a PassManager run, like TVM's pass instruments; both hooks do nothing by default."""

    def run_started(self, gm: GraphModule, analyses: Analyses) -> None:
        """Called once with the input graph, before the first pass."""

    def after_pass(self, run: PassRun, gm: GraphModule, analyses: Analyses) -> None:
        """Called after each pass, once the graph is linted and recompiled."""


def check_requires(info: PassInfo, analyses: Analyses) -> None:
    """The first missing prerequisite in pipeline order, as an error naming the pass and it."""
    missing = [name for name in PROVIDERS if name in info.requires and name not in analyses]
    if missing:
        raise MissingAnalysisError(missing[0], needed_by=info.name)


def check_provides(info: PassInfo, analyses: Analyses) -> None:
    missing = sorted(name for name in info.provides if name not in analyses)
    if missing:
        raise CompileError(f"pass {info.name} declares it provides {missing} but did not record them")


def run_pass(pass_: Pass, gm: GraphModule, analyses: Analyses) -> tuple[GraphModule, float]:
    """Run one pass under its contract; return the graph and the pass's own run time."""
    info = pass_.info
    check_requires(info, analyses)
    start = time.perf_counter()
    try:
        gm = pass_.run(gm, analyses)
    except MissingAnalysisError as error:  # it read an analysis it did not declare: name it
        if error.needed_by is not None:
            raise
        raise MissingAnalysisError(error.analysis, needed_by=info.name) from None
    seconds = time.perf_counter() - start
    gm.graph.lint()
    gm.recompile()
    check_provides(info, analyses)
    return gm, seconds


@dataclass
class PassManager:
    passes: list[Pass]
    instruments: list[Instrument] = field(default_factory=list)

    def run(self, gm: GraphModule, analyses: Analyses) -> GraphModule:
        """Run every pass in order, recording into ``analyses`` (which may already hold what the
        input graph provides), with the instruments notified around them."""
        for instrument in self.instruments:
            instrument.run_started(gm, analyses)
        for number, pass_ in enumerate(self.passes, start=1):
            gm, seconds = run_pass(pass_, gm, analyses)
            for instrument in self.instruments:
                instrument.after_pass(PassRun(number, pass_.info, seconds), gm, analyses)
        return gm
