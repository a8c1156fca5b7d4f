"""Reshaped views of a normalized tensor, and BatchNormalization fed by its own statistics.

tf_keras' LayerNormalization (the path tf2onnx converts) reshapes ``x [..., D]`` to
``[1, rows, D, 1]``, computes FusedBatchNormV3's training-mode statistics there
(ReduceMean over axes [0, 2, 3], ReduceSumSquare of the centred value divided by a count computed
from ``Shape``, a Squeeze of the mean) and normalizes with an inference-mode
``BatchNormalization(x4d, ones, zeros, mean, var, epsilon)`` before reshaping back and applying
gamma / beta. Per row the values are exactly a layer norm of ``x`` over its trailing axes.

A :class:`View` is such a reshape of the candidate's input ``X``: the matcher walks ``X`` itself
and gives the reshaped tensor the same symbolic value in another layout. A view is valid when, in
row-major order, its non-normalized axes (the rows) come before its normalized ones, the
normalized sizes multiply to ``D = prod(X.shape[k:])`` for some ``k`` and the rows to the rest of
``X``'s shape, so element ``(row, j)`` is the same number in both layouts. Inside a view only
scalar constants may meet the value (a vector would broadcast along the view's own axes); a
Reshape back to ``X``'s shape returns to ``X``'s layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from lnfuse import ir, shapes
from lnfuse.graph import ModelGraph


@dataclass(frozen=True)
class View:
    """The layout of a reshaped ``X``: its shape and which of its (positive) axes are normalized."""

    terms: tuple[shapes.Mono, ...]
    norm: frozenset[int]  # normalized axes of size != 1
    ones: frozenset[int]  # axes of size 1 (either side)

    @property
    def rank(self) -> int:
        return len(self.terms)

    def reduces_rows(self, axes: list[int] | None) -> bool:
        """``axes`` (of this view) are exactly the normalized ones, give or take size-1 axes."""
        if axes is None:
            return False
        pos = {a + self.rank if a < 0 else a for a in axes}
        return all(0 <= a < self.rank for a in pos) and pos - self.ones == set(self.norm)

    def squeezes_rows(self, axes: list[int] | None) -> bool:
        """``axes`` remove every normalized and size-1 axis (what a keepdims=0 reduction leaves)."""
        if axes is None:
            return False
        pos = {a + self.rank if a < 0 else a for a in axes}
        return pos == set(self.norm) | set(self.ones)

    def channel_rows(self) -> bool:
        """The rows are axis 1 alone: BatchNormalization's per-channel statistics are per row."""
        return (
            all(a in self.norm or a in self.ones for a in range(self.rank) if a != 1) and 1 not in self.norm
        )


def entry(
    mg: ModelGraph, t: ir.Tensor, raw_axes: list[int] | None
) -> tuple[ir.Tensor, tuple[int, ...], View] | None:
    """``(X, X's normalized axes, view)`` when ``t = Reshape(X, shape)`` is a valid view whose
    normalized axes are ``raw_axes``; else None."""
    p = mg.producer(t)
    if p is None or p.op != "Reshape" or p.domain or len(p.inputs) < 2 or raw_axes is None:
        return None
    terms = shapes.reshape_target(mg, p, keep_hole=True)
    x0 = p.inputs[0]
    if terms is None:
        return None
    rank = len(terms)
    pos = {a + rank if a < 0 else a for a in raw_axes}
    if not all(0 <= a < rank for a in pos):
        return None
    ones = frozenset(i for i, m in enumerate(terms) if m == shapes.ONE)
    norm = frozenset(pos - ones)
    rows = [i for i in range(rank) if i not in pos and i not in ones]
    d = shapes.as_int(shapes.product([terms[a] for a in norm]))
    if not norm or d is None or d <= 0 or (rows and max(rows) > min(norm)):
        return None
    # X's trailing dims that multiply to d are the normalized ones: element (row, j) of X seen as
    # [rows, d] is element (row, j) of the view (rows before normalized axes, row-major). A rank
    # that shape inference could not give is fine when those trailing dims are known.
    tail = shapes.trailing(mg, x0)
    if not tail:
        return None
    size = 1
    for j in range(1, len(tail) + 1):
        size *= tail[-j]
        if size == d:
            return x0, tuple(range(-j, 0)), View(tuple(terms), norm, ones)
        if size > d:
            break
    return None


def restores(mg: ModelGraph, node: ir.Node, x: ir.Tensor, view: View | None = None) -> bool:
    """``node`` is a Reshape (of a value in ``view``) whose target is ``x``'s own shape."""
    if node.op != "Reshape" or node.domain or len(node.inputs) < 2:
        return False
    src = mg.producer(node.inputs[1])
    for _ in range(4):  # Reshape(., Cast(Shape(x))): x's shape, whatever is known of it
        if src is None or src.op not in ("Cast", "Identity") or src.domain:
            break
        src = mg.producer(src.inputs[0])
    whole = src is not None and not src.attrs.get("start") and src.attrs.get("end") is None
    if whole and src.op == "Shape" and src.inputs[0] is x:  # type: ignore[union-attr]
        return True
    known = {id(node.inputs[0]): list(view.terms)} if view is not None else None
    target = shapes.reshape_target(mg, node, known=known)
    return target is not None and target == shapes.shape_of(mg, x)


def scalar_fill(mg: ModelGraph, t: ir.Tensor) -> float | None:
    """The one value of a constant whose elements are all equal, or of ``Expand(scalar, shape)``."""
    v = mg.const_value(t)
    if v is None:
        p = mg.producer(t)
        if p is None or p.op != "Expand" or p.domain or len(p.inputs) != 2:
            return None
        v = mg.const_value(p.inputs[0])
    if v is None or v.size == 0 or v.dtype.kind != "f":
        return None
    flat = v.reshape(-1)
    first = float(flat[0])
    return first if bool((flat == flat[0]).all()) else None


def batch_norm_ok(mg: ModelGraph, node: ir.Node) -> str:
    """Why a BatchNormalization cannot be read as ``(x - mean) / sqrt(var + eps) * s + b`` ('' if it can)."""
    if int(node.attrs.get("training_mode", 0)):
        return "BatchNormalization in training mode"
    if int(node.attrs.get("spatial", 1)) != 1:
        return "BatchNormalization with spatial=0"
    if len(node.inputs) != 5:
        return "BatchNormalization without its five inputs"
    for extra in node.outputs[1:]:
        if extra.name and (extra.outputs or mg.is_graph_output(extra)):
            return "BatchNormalization's running statistics are used"
    return ""
