"""Every reduction (and run-time-fed BatchNormalization) that no pass fused, with its reason.

Users whose norm was missed need to see *why*: "refused candidates: 0" on a model full of
ReduceMean says nothing. :func:`snapshot` lists the anchors before any pass runs; after the
passes :func:`left_alone` returns those that are neither in a fused match nor in a refused
candidate, each with the note its own walk left (``PassContext.anchor_notes``) or a default
reason for its kind. ``--explain`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lnfuse.graph import ModelGraph, node_label
from lnfuse.matcher import REDUCE_OPS, reduce_axes
from lnfuse.report import AnchorRecord, Report


class AnchorKind(str, Enum):
    REDUCTION = "reduction"
    BATCH_NORM = "batch-norm"  # BatchNormalization fed by statistics computed at run time


@dataclass(frozen=True, slots=True)
class Anchor:
    label: str
    op: str
    graph: str
    kind: AnchorKind
    default_reason: str


def snapshot(mg: ModelGraph) -> list[Anchor]:
    """The anchors of the model as it is now (call before the passes rewrite it)."""
    out: list[Anchor] = []
    for view in mg.views:
        for op in (*REDUCE_OPS, "BatchNormalization"):
            for node in view.nodes_by_op.get(op, ()):
                if node.domain:
                    continue
                if op == "BatchNormalization":
                    stats = node.inputs[3:5]
                    if len(stats) < 2 or all(mg.const_value(t) is not None for t in stats):
                        continue  # inference BN with constant running statistics: not a candidate
                    reason = "BatchNormalization fed by statistics computed at run time that do not form a layer norm"
                    out.append(Anchor(node_label(node), op, view.path, AnchorKind.BATCH_NORM, reason))
                    continue
                out.append(Anchor(node_label(node), op, view.path, AnchorKind.REDUCTION, _default(mg, node)))
    return out


def _default(mg: ModelGraph, node: object) -> str:
    _axes, ok = reduce_axes(mg, node)  # type: ignore[arg-type]
    if not ok:
        if node.op == "GlobalAveragePool":  # type: ignore[attr-defined]
            return "GlobalAveragePool of an input of unknown rank"
        return f"{node.op} axes are not constant (nor computable from static shapes)"  # type: ignore[attr-defined]
    src = mg.producer(node.inputs[0])  # type: ignore[attr-defined]
    squares = node.op == "ReduceSumSquare" or (  # type: ignore[attr-defined]
        src is not None and src.op in ("Mul", "Pow") and (src.op == "Pow" or src.inputs[0] is src.inputs[1])
    )
    if squares:
        return "reduces a square that no layer norm uses (an RMSNorm is fused only with --rmsnorm)"
    return "its input's mean never becomes part of (x - mean) / sqrt(var + eps) * gamma + beta"


def left_alone(anchors: list[Anchor], report: Report, notes: dict[str, str]) -> list[AnchorRecord]:
    """Anchors outside every fused match and every refused candidate, with their reasons."""
    labels = {a.label for a in anchors}
    covered: set[str] = set()
    for group in (report.matches, report.found_not_rewritten, report.refusals):
        for item in group:
            covered.update(n for n in item.nodes if n in labels)
            covered.add(getattr(item, "anchor", ""))
    return [
        AnchorRecord(a.op, a.label, a.graph, notes.get(a.label, a.default_reason))
        for a in anchors
        if a.label not in covered
    ]
