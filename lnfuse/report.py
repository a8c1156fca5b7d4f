"""What an optimize run did: matches, refusals, opset change, timings; text and JSON renderings."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lnfuse.symbolic import Flag


def _own(record: object, fields: tuple[str, ...]) -> None:
    """Give a frozen record its own copies of the graph's names it holds (``fields``: str fields
    and tuples of str).

    Node and tensor names come from the graph objects, which are freed after export
    (``ModelGraph.release``). A report holding those very string objects, one name per few
    hundred bytes all over the allocator's 1 MiB arenas, would keep every arena of the graph
    allocated through the output check and the save (about 60 MiB on a 110k-node model). The
    other strings (op, pattern, reasons) are the code's own or made for the record: not copied.
    """
    for name in fields:
        value = getattr(record, name)
        if type(value) is str:
            object.__setattr__(record, name, _copy(value))
        elif type(value) is tuple and value and type(value[0]) is str:
            object.__setattr__(record, name, tuple(_copy(v) if type(v) is str else v for v in value))


def _copy(s: str) -> str:
    """A new string object equal to ``s`` (``str(s)`` and slicing return ``s`` itself)."""
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class MatchRecord:
    """One fused normalization."""

    op: str  # LayerNormalization / RMSNormalization
    pattern: str
    graph: str
    output: str
    input: str
    nodes: tuple[str, ...]
    epsilon: float
    axis: int
    stash_type: int
    normalized_shape: tuple[int, ...]
    flags: tuple[str, ...]
    scale: str | None = None  # name of the original initializer reused as Scale, if any
    bias: str | None = None
    added: tuple[str, ...] = ()  # ops added around the norm (Transpose, Cast)

    def __post_init__(self) -> None:
        _own(self, ("output", "input", "nodes", "scale", "bias"))


@dataclass(frozen=True, slots=True)
class RefusalRecord:
    """A normalization-looking subgraph left alone, and why."""

    reason: str
    nodes: tuple[str, ...]
    anchor: str
    graph: str
    pass_name: str

    def __post_init__(self) -> None:
        _own(self, ("nodes", "anchor"))


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """A reduction (or run-time-fed BatchNormalization) that is part of no fused or refused norm."""

    op: str
    anchor: str
    graph: str
    reason: str

    def __post_init__(self) -> None:
        _own(self, ("anchor",))


@dataclass(frozen=True, slots=True)
class Group:
    """Matches that share gain/bias/epsilon: the per-time-step norms of one recurrent layer."""

    description: str
    count: int
    graph: str
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        _own(self, ("outputs",))


@dataclass
class Report:
    """Everything ``lnfuse optimize`` says about one model."""

    source: str = "<model>"
    nodes_before: int = 0
    nodes_after: int = 0
    opset_before: int | None = None
    opset_after: int | None = None
    opset_note: str = ""
    matches: list[MatchRecord] = field(default_factory=list)
    refusals: list[RefusalRecord] = field(default_factory=list)
    found_not_rewritten: list[MatchRecord] = field(default_factory=list)
    left_alone: list[AnchorRecord] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    hoisted: list[str] = field(default_factory=list)
    hoist_refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    proofs_run: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    changed: bool = False
    validation: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None

    # -- summaries ------------------------------------------------------------
    def by_pattern(self) -> dict[str, int]:
        return dict(Counter(m.pattern for m in self.matches))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["by_pattern"] = self.by_pattern()
        d["fused"] = len(self.matches)
        d["refused"] = len(self.refusals)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def render_text(self, explain: bool = False) -> str:
        lines: list[str] = []
        n_ln = sum(1 for m in self.matches if m.op == "LayerNormalization")
        n_rms = sum(1 for m in self.matches if m.op == "RMSNormalization")
        fused = f"{n_ln} LayerNormalization" + (f", {n_rms} RMSNormalization" if n_rms else "")
        lines.append(f"{self.source}: fused {fused}")
        if self.matches:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.by_pattern().items()))
            lines.append(f"  patterns: {kinds}")
        lines.append(f"  nodes: {self.nodes_before} -> {self.nodes_after}")
        if self.opset_before != self.opset_after:
            lines.append(f"  opset: {self.opset_before} -> {self.opset_after}")
        else:
            lines.append(f"  opset: {self.opset_before} (unchanged)")
        if self.opset_note:
            lines.append(f"  note: {self.opset_note}")
        for g in self.groups:
            lines.append(f"  recurrence: {g.description}")
        for h in self.hoisted:
            lines.append(f"  hoisted: {h}")
        transposed = sum(1 for m in self.matches if Flag.TRANSPOSED in m.flags)
        if transposed:
            lines.append(f"  transposes added around {transposed} norm(s) over non-trailing axes")
        if self.found_not_rewritten:
            lines.append(f"  found but not rewritten: {len(self.found_not_rewritten)} (see --explain)")
        lines.append(
            f"  refused candidates: {len(self.refusals)}"
            + ("" if explain or not self.refusals else " (--explain lists them)")
        )
        if self.left_alone:
            lines.append(
                f"  reductions left alone: {len(self.left_alone)}"
                + ("" if explain else " (--explain lists them)")
            )
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        if self.validation is not None:
            ok = self.validation.get("ok")
            lines.append(
                f"  validation: {'equal' if ok else 'NOT EQUAL'} on {self.validation.get('provider', '?')}"
            )
        if explain:
            for m in self.matches:
                lines.append(
                    f"  + {m.op} [{m.pattern}] {m.graph}: {m.input} -> {m.output} eps={m.epsilon:.9g} axis={m.axis} "
                    f"stash_type={m.stash_type} shape={list(m.normalized_shape)}"
                    + (f" flags={','.join(m.flags)}" if m.flags else "")
                    + f" nodes={','.join(m.nodes)}"
                )
            for m in self.found_not_rewritten:
                lines.append(
                    f"  ~ {m.op} [{m.pattern}] {m.graph}: {m.output} found, not rewritten (nodes={','.join(m.nodes)})"
                )
            for h in self.hoist_refusals:
                lines.append(f"  - {h}")
            for r in self.refusals:
                lines.append(
                    f"  - refused at {r.graph}:{r.anchor}: {r.reason}"
                    + (f" (nodes={','.join(r.nodes)})" if r.nodes else "")
                )
            for a in self.left_alone:
                lines.append(f"  . left alone {a.graph}:{a.anchor} ({a.op}): {a.reason}")
        return "\n".join(lines)


def _json_default(o: object) -> object:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)
