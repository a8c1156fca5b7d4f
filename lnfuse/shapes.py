"""Shape-derived values, evaluated for the candidate at hand (the user's graph is never folded).

Exporters compute counts, axes lists and target shapes from ``Shape``: tf2onnx divides a sum of
squares by ``Cast(ReduceProd(Gather(Shape(x), axes)))``, ONNX's LayerNormalization body reshapes
Mean / InvStdDev to ``Concat(Slice(Shape(X), 0, axis), ConstantOfShape(Size(Shape(X)) - axis))``,
RMSNormalization's body reduces over ``Range(Size(Shape(X)) + axis, Size(Shape(X)), 1)``.

Two evaluators over the same small op set:

* :func:`fold` gives the numeric value of such a tensor when every dim it reads is static (only
  the rank is needed for ``Size(Shape(x))``); :meth:`lnfuse.graph.ModelGraph.const_value` calls it.
* :func:`dims` gives a 1-D shape value as a tuple of terms, each an ``int`` or ``DimRef(tensor id,
  axis)`` (the run-time size of that axis), so ``Concat(Slice(Shape(X), 0, 2), [1, 1])`` is known to
  equal ``X.shape[:2] + [1, 1]`` even when ``X``'s batch is dynamic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from lnfuse.graph import ModelGraph

SHAPE_OPS = frozenset({"Shape", "Size", "Slice", "Concat", "ConstantOfShape", "Range", "Gather"})
_MAX_LEN = 64
_TERM_OPS = frozenset({"Shape", "Slice", "Concat", "Gather"})


class DimRef(NamedTuple):
    """The run-time size of axis ``axis`` of the tensor whose ``id()`` is ``tensor``."""

    tensor: int
    axis: int


Term = int | DimRef


def _ints(mg: ModelGraph, t: gs.Tensor, depth: int) -> list[int] | None:
    v = mg.const_value(t, depth + 1)
    if v is None or v.dtype.kind not in "iu" or v.size > _MAX_LEN:
        return None
    return [int(a) for a in v.reshape(-1)]


def _shape_terms(mg: ModelGraph, node: gs.Node) -> list[Term] | None:
    """``Shape(t)`` (with its start / end) as terms: static dims as ints, others as DimRefs."""
    t = node.inputs[0]
    shape = mg.shape(t)
    if shape is None:
        return None
    terms: list[Term] = [d if isinstance(d, int) else DimRef(id(t), i) for i, d in enumerate(shape)]
    rank = len(terms)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = max(0, min(rank, start + rank if start < 0 else start))
    stop = rank if end is None else max(0, min(rank, int(end) + rank if int(end) < 0 else int(end)))
    return terms[start:stop]


def _slice(mg: ModelGraph, node: gs.Node, seq: list[Term], depth: int) -> list[Term] | None:
    if len(node.inputs) < 3:  # opset < 10: starts / ends as attributes
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", [0]), [1]
    else:
        starts, ends = _ints(mg, node.inputs[1], depth), _ints(mg, node.inputs[2], depth)
        axes = _ints(mg, node.inputs[3], depth) if len(node.inputs) > 3 and node.inputs[3].name else [0]
        steps = _ints(mg, node.inputs[4], depth) if len(node.inputs) > 4 and node.inputs[4].name else [1]
    if not starts or not ends or axes is None or steps is None or list(axes) not in ([0], [-1]):
        return None
    if len(starts) != 1 or len(ends) != 1 or steps != [1]:
        return None
    n = len(seq)
    s, e = int(starts[0]), int(ends[0])
    s = max(0, min(n, s + n if s < 0 else s))
    e = max(0, min(n, e + n if e < 0 else e))
    return seq[s:e]


def dims(mg: ModelGraph, t: gs.Tensor, depth: int = 0) -> list[Term] | None:
    """``t`` (a 1-D int64 shape value) as terms, or None when it is not known this way."""
    if depth > 12:
        return None
    node = t.inputs[0] if t.inputs else None
    if node is None or node.domain or node.op not in _TERM_OPS or not node.inputs:
        const = mg.const_value(t, depth + 1)
        if const is None or const.dtype.kind not in "iu" or const.ndim > 1 or const.size > _MAX_LEN:
            return None
        return [int(a) for a in const.reshape(-1)]
    if node.op == "Shape":
        return _shape_terms(mg, node)
    if node.op == "Slice":
        seq = dims(mg, node.inputs[0], depth + 1)
        return None if seq is None else _slice(mg, node, seq, depth)
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        out: list[Term] = []
        for part in node.inputs:
            seq = dims(mg, part, depth + 1)
            if seq is None:
                return None
            out += seq
        return out
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        seq = dims(mg, node.inputs[0], depth + 1)
        idx = mg.const_value(node.inputs[1], depth + 1)
        if seq is None or idx is None or idx.ndim != 1:
            return None
        n = len(seq)
        picked = [int(i) + n if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        return None if any(not 0 <= i < n for i in picked) else [seq[i] for i in picked]
    return None


def fold(mg: ModelGraph, node: gs.Node, depth: int) -> np.ndarray | None:
    """Numeric value of a shape op's output when every dim it reads is static."""
    op = node.op
    if op == "Size":
        src = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if src is not None and src.op == "Shape" and not src.domain:
            terms = _shape_terms(mg, src)
            return None if terms is None else np.asarray(len(terms), dtype=np.int64)
        v = mg.const_value(node.inputs[0], depth + 1)
        if v is None:
            shape = mg.shape(node.inputs[0])
            if shape is None or not all(isinstance(d, int) for d in shape):
                return None
            return np.asarray(int(np.prod(shape)), dtype=np.int64)  # type: ignore[arg-type]
        return np.asarray(v.size, dtype=np.int64)
    if op == "ConstantOfShape":
        n = _ints(mg, node.inputs[0], depth)
        if n is None or len(n) > 8 or any(d < 0 for d in n) or int(np.prod(n)) > _MAX_LEN:
            return None
        fill = node.attrs.get("value")
        base = np.asarray(getattr(fill, "values", np.zeros(1, dtype=np.float32))).reshape(-1)
        return np.full(n, base[0] if base.size else 0, dtype=base.dtype)
    if op == "Range":
        args = [mg.const_value(i, depth + 1) for i in node.inputs[:3]]
        if len(args) != 3 or any(a is None or a.size != 1 for a in args):
            return None
        start, limit, delta = (np.asarray(a).reshape(-1)[0] for a in args)  # type: ignore[union-attr]
        if delta == 0 or abs((limit - start) / delta) > _MAX_LEN:
            return None
        return np.arange(start, limit, delta, dtype=np.asarray(args[0]).dtype)
    terms = dims(mg, node.outputs[0], depth) if op in ("Shape", "Slice", "Concat", "Gather") else None
    if terms is None or not all(isinstance(d, int) for d in terms):
        return None
    return np.asarray(terms, dtype=np.int64)
