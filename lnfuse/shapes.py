"""Shape-derived values, evaluated for the candidate at hand (the user's graph is never folded).

Exporters compute counts, axes lists and target shapes from ``Shape``: tf2onnx divides a sum of
squares by ``Cast(ReduceProd(Gather(Shape(x), axes)))`` and reshapes back with
``Cast(Shape(x))``; ONNX's LayerNormalization body reshapes Mean / InvStdDev to
``Concat(Slice(Shape(X), 0, axis), ConstantOfShape(Size(Shape(X)) - axis))``; RMSNormalization's
body reduces over ``Range(Size(Shape(X)) + axis, Size(Shape(X)), 1)``.

A dim is a :data:`Mono`: ``(coefficient, run-time sizes)``, the product of an int and of the
sizes of some axes known only at run time (each a :class:`DimRef`, followed back through
Transpose / Identity / Cast / Reshape so that the same axis has one name). ``16`` is
``(16, ())``, "the batch" ``(1, (DimRef(x, 0),))``, "batch * seq" a product of two refs. So
``Concat(Slice(Shape(X), 0, 2), [1, 1])`` is known to equal ``X.shape[:2] + [1, 1]`` even when
``X``'s batch is dynamic.

* :func:`dims` gives a 1-D shape value as monos, or None.
* :func:`fold` gives the numeric value of a shape op when every mono is an int (only the rank
  is needed for ``Size(Shape(x))``); :meth:`lnfuse.graph.ModelGraph.const_value` calls it.
* :func:`shape_of` gives a tensor's shape as monos.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from lnfuse import ir

if TYPE_CHECKING:
    from lnfuse.graph import ModelGraph

SHAPE_OPS = frozenset({"Shape", "Size", "Slice", "Concat", "ConstantOfShape", "Range", "Gather"})
_TERM_OPS = frozenset({"Shape", "Slice", "Concat", "Gather", "Cast", "Unsqueeze", "Squeeze", "ReduceProd"})
_SAME_DIMS = frozenset({"Identity", "Cast", "Relu", "Neg", "Sigmoid", "Tanh", "Abs"})
_MAX_LEN = 64


class DimRef(NamedTuple):
    """The run-time size of axis ``axis`` of the tensor whose ``id()`` is ``tensor``."""

    tensor: int
    axis: int


Mono = tuple[int, tuple[DimRef, ...]]
ONE: Mono = (1, ())


def mono(d: int | DimRef) -> Mono:
    return (d, ()) if isinstance(d, int) else (1, (d,))


def mono_mul(a: Mono, b: Mono) -> Mono:
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def mono_div(a: Mono, b: Mono) -> Mono | None:
    """``a / b`` when it is exact (b's refs all in a, coefficients divide), else None."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    refs = list(a[1])
    for r in b[1]:
        if r not in refs:
            return None
        refs.remove(r)
    return (a[0] // b[0], tuple(refs))


def as_int(m: Mono) -> int | None:
    return m[0] if not m[1] else None


def product(ms: list[Mono]) -> Mono:
    out = ONE
    for m in ms:
        out = mono_mul(out, m)
    return out


def canonical(mg: ModelGraph, t: ir.Tensor, axis: int) -> DimRef:
    """One name for a run-time dim: followed back through Transpose and same-shape unary ops."""
    for _ in range(16):
        p = t.inputs[0] if t.inputs else None
        if p is None or p.domain or not p.inputs:
            break
        if p.op == "Transpose":
            perm = p.attrs.get("perm")
            if perm is None or not 0 <= axis < len(perm):
                break
            t, axis = p.inputs[0], int(perm[axis])
        elif p.op in _SAME_DIMS:
            t = p.inputs[0]
        else:
            break
    return DimRef(id(t), axis)


Known = dict[int, list[Mono]]  # tensor id -> its shape, where the caller knows better (a proof input)


def shape_of(mg: ModelGraph, t: ir.Tensor, known: Known | None = None) -> list[Mono] | None:
    """``t``'s shape as monos: static dims, else the Reshape target it came from, else DimRefs."""
    if known and id(t) in known:
        return known[id(t)]
    shape = mg.shape(t)
    p = t.inputs[0] if t.inputs else None
    dynamic = shape is None or not all(isinstance(d, int) for d in shape)
    if dynamic and p is not None and p.op == "Reshape" and not p.domain and len(p.inputs) > 1:
        target = reshape_target(mg, p, known=known)
        if target is not None:
            return target
    if shape is None:
        return None
    return [(d, ()) if isinstance(d, int) else mono(canonical(mg, t, i)) for i, d in enumerate(shape)]


_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"})


def trailing(mg: ModelGraph, t: ir.Tensor, depth: int = 0) -> list[int] | None:
    """The static trailing dims of ``t`` even when its rank is unknown: an elementwise op's output
    has, at each trailing position where one input has a static size ``d > 1``, that size (the
    other input must be 1 or ``d`` there, or the model cannot run)."""
    shape = mg.shape(t)
    if shape is not None:
        out = []
        for d in reversed(shape):
            if not isinstance(d, int):
                break
            out.insert(0, d)
        return out
    p = t.inputs[0] if t.inputs else None
    if p is None or p.domain or depth > 8 or not p.inputs:
        return None
    if p.op in _SAME_DIMS:
        return trailing(mg, p.inputs[0], depth + 1)
    if p.op not in _BROADCAST_OPS:
        return None
    parts = [trailing(mg, i, depth + 1) or [] for i in p.inputs]
    out = []
    for pos in range(1, max(len(q) for q in parts) + 1):
        sizes = {q[-pos] for q in parts if len(q) >= pos}
        big = sizes - {1}
        if len(big) > 1:
            return None  # the model cannot run
        if big:
            out.insert(0, big.pop())
        elif all(len(q) >= pos for q in parts):
            out.insert(0, 1)
        else:
            break
    return out


def reshape_target(
    mg: ModelGraph, node: ir.Node, depth: int = 0, known: Known | None = None, keep_hole: bool = False
) -> list[Mono] | None:
    """The output shape of a Reshape: its target with 0 (copy) and one -1 (the rest) resolved
    (``keep_hole``: a -1 that cannot be resolved stays -1)."""
    target = dims(mg, node.inputs[1], depth + 1, known)
    if target is None or int(node.attrs.get("allowzero", 0)):
        return None
    src = shape_of(mg, node.inputs[0], known) if any(m in ((0, ()), (-1, ())) for m in target) else None
    out: list[Mono] = []
    for i, m in enumerate(target):
        if m == (0, ()):
            if src is None or i >= len(src):
                return None
            m = src[i]
        out.append(m)
    holes = [i for i, m in enumerate(out) if m == (-1, ())]
    if len(holes) > 1:
        return None
    if holes:
        if src is None:
            return out if keep_hole else None
        rest = mono_div(product(src), product([m for i, m in enumerate(out) if i != holes[0]]))
        if rest is None:
            return None
        out[holes[0]] = rest
    return out


def _ints(mg: ModelGraph, t: ir.Tensor, depth: int) -> list[int] | None:
    v = mg.const_value(t, depth + 1)
    if v is None or v.dtype.kind not in "iu" or v.size > _MAX_LEN:
        return None
    return [int(a) for a in v.reshape(-1)]


def _clamp(i: int, n: int) -> int:
    return max(0, min(n, i + n if i < 0 else i))


def _shape_monos(mg: ModelGraph, node: ir.Node, known: Known | None = None) -> list[Mono] | None:
    """``Shape(t)`` with its start / end."""
    terms = shape_of(mg, node.inputs[0], known)
    if terms is None:
        return None
    rank = len(terms)
    end = node.attrs.get("end")
    stop = rank if end is None else _clamp(int(end), rank)
    return terms[_clamp(int(node.attrs.get("start", 0)), rank) : stop]


def _slice(mg: ModelGraph, node: ir.Node, seq: list[Mono], depth: int) -> list[Mono] | None:
    if len(node.inputs) < 3:  # opset < 10: starts / ends as attributes
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = list(node.attrs.get("axes", [0])), [1]
    else:
        starts, ends = _ints(mg, node.inputs[1], depth), _ints(mg, node.inputs[2], depth)
        axes = _ints(mg, node.inputs[3], depth) if len(node.inputs) > 3 and node.inputs[3].name else [0]
        steps = _ints(mg, node.inputs[4], depth) if len(node.inputs) > 4 and node.inputs[4].name else [1]
    if (
        not starts
        or not ends
        or axes not in ([0], [-1])
        or steps != [1]
        or len(starts) != 1
        or len(ends) != 1
    ):
        return None
    n = len(seq)
    return seq[_clamp(int(starts[0]), n) : _clamp(min(int(ends[0]), 1 << 40), n)]


def _gather(mg: ModelGraph, node: ir.Node, depth: int, known: Known | None) -> list[Mono] | None:
    seq = dims(mg, node.inputs[0], depth + 1, known)
    idx = mg.const_value(node.inputs[1], depth + 1)
    if seq is None or idx is None or idx.ndim > 1 or int(node.attrs.get("axis", 0)) != 0:
        return None
    n = len(seq)
    picked = [int(i) + n if int(i) < 0 else int(i) for i in idx.reshape(-1)]
    return None if any(not 0 <= i < n for i in picked) else [seq[i] for i in picked]


def dims(mg: ModelGraph, t: ir.Tensor, depth: int = 0, known: Known | None = None) -> list[Mono] | None:
    """``t`` (a 0-D or 1-D int shape value) as monos, or None when it is not known this way."""
    if depth > 16:
        return None
    node = t.inputs[0] if t.inputs else None
    if node is None or node.domain or node.op not in _TERM_OPS or not node.inputs:
        const = mg.const_value(t, depth + 1)
        if const is None or const.dtype.kind not in "iu" or const.ndim > 1 or const.size > _MAX_LEN:
            return None
        return [(int(a), ()) for a in const.reshape(-1)]
    op = node.op
    if op == "Shape":
        return _shape_monos(mg, node, known)
    if op == "Gather":
        return _gather(mg, node, depth, known)
    if op == "Concat":
        out: list[Mono] = []
        for part in node.inputs:
            seq = dims(mg, part, depth + 1, known)
            if seq is None:
                return None
            out += seq
        return out if int(node.attrs.get("axis", 0)) in (0, -1) else None
    seq = dims(mg, node.inputs[0], depth + 1, known)
    if seq is None:
        return None
    if op == "Slice":
        return _slice(mg, node, seq, depth)
    if op == "ReduceProd":
        ok = "axes" not in node.attrs or list(node.attrs["axes"]) in ([0], [-1])
        return [product(seq)] if ok and len(node.inputs) == 1 else None
    if op == "Cast" and int(node.attrs.get("to", 0)) not in (6, 7):  # int32 / int64 only
        return None
    return seq  # Cast between int types, Unsqueeze / Squeeze of a scalar or 1-D value


def fold(mg: ModelGraph, node: ir.Node, depth: int) -> np.ndarray | None:
    """Numeric value of a shape op's output when every dim it reads is static."""
    op = node.op
    if op == "Size":
        src = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if src is not None and src.op == "Shape" and not src.domain:
            terms = _shape_monos(mg, src)
            return None if terms is None else np.asarray(len(terms), dtype=np.int64)
        terms = shape_of(mg, node.inputs[0])
        total = None if terms is None else as_int(product(terms))
        return None if total is None else np.asarray(total, dtype=np.int64)
    if op == "ConstantOfShape":
        n = _ints(mg, node.inputs[0], depth)
        if n is None or len(n) > 8 or any(d < 0 for d in n) or math.prod(n) > _MAX_LEN:
            return None
        fill = node.attrs.get("value")
        base = (np.zeros(1, dtype=np.float32) if fill is None else ir.tensor_array(fill)).reshape(-1)
        return np.full(n, base[0] if base.size else 0, dtype=base.dtype)
    if op == "Range":
        args = [mg.const_value(i, depth + 1) for i in node.inputs[:3]]
        if len(args) != 3 or any(a is None or a.size != 1 for a in args):
            return None
        start, limit, delta = (np.asarray(a).reshape(-1)[0] for a in args)  # type: ignore[union-attr]
        if delta == 0 or abs((limit - start) / delta) > _MAX_LEN:
            return None
        return np.arange(start, limit, delta, dtype=np.asarray(args[0]).dtype)
    terms = dims(mg, node.outputs[0], depth) if op in _TERM_OPS else None
    if terms is None or any(m[1] for m in terms):
        return None
    return np.asarray([m[0] for m in terms], dtype=np.int64)


def evaluate(mg: ModelGraph, t: ir.Tensor, known: Known, refs: dict[DimRef, int]) -> np.ndarray | None:
    """The value of a shape-derived tensor (or ``Expand(scalar, shape)``) for concrete input shapes:
    ``known`` gives tensors' shapes, ``refs`` the run-time dims' sizes. For the per-match proof."""
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "Expand" and not p.domain and len(p.inputs) == 2:
        fill = mg.const_value(p.inputs[0])
        shape = evaluate(mg, p.inputs[1], known, refs)
        if fill is None or fill.size != 1 or shape is None or shape.size > 8 or np.prod(shape) > 1 << 16:
            return None
        return np.full([int(d) for d in shape], fill.reshape(-1)[0], dtype=fill.dtype)
    seq = dims(mg, t, 0, known)
    if seq is None:
        return None
    out = []
    for coef, rs in seq:
        if any(r not in refs for r in rs):
            return None
        out.append(coef * math.prod(refs[r] for r in rs))
    return np.asarray(out, dtype=np.int64)
