"""Values and shapes of a tensor derived from its producer, for the candidate at hand.

* :func:`fold`: the value of a small node applied to constants (what exporters put around eps
  and gamma: Identity / Cast / Flatten / Reshape / Unsqueeze / Squeeze / arithmetic, and
  shape-derived counts), never written back into the user's graph;
* :func:`derived_shape`: a shape ONNX shape inference could not give, from the producer (a
  Reshape's target, a same-shape unary op, a broadcast, a layout op).

Both are reached through :class:`lnfuse.graph.ModelGraph` (``const_value`` / ``shape``), which
caches them per tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from lnfuse import ir, shapes
from lnfuse.ir import FLOAT_TYPES, Dim, np_dtype

if TYPE_CHECKING:
    from lnfuse.graph import ModelGraph

_SAME_SHAPE_UNARY = frozenset(
    {"Identity", "Cast", "Relu", "Neg", "Sigmoid", "Tanh", "Abs", "Sqrt", "Reciprocal", "Exp", "Erf"}
)
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
_LAYOUT_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze", "MatMul", "Gemm", "Split", "GlobalAveragePool"})


def fold(mg: ModelGraph, node: ir.Node, depth: int) -> np.ndarray | None:
    """Value of a small node applied to constants: what exporters put around eps/gamma, and
    the ``N`` of an unbiased variance computed from ``Shape`` (static dims only)."""
    op = node.op
    if op == "Gather" and _is_shape_gather(node):
        value = _fold_shape_gather(mg, node, depth)
        return value if value is not None else shapes.fold(mg, node, depth)
    if op in shapes.SHAPE_OPS:
        return shapes.fold(mg, node, depth)
    return _fold_rest(mg, node, depth)


def _fold_shape_gather(mg: ModelGraph, node: ir.Node, depth: int) -> np.ndarray | None:
    """Gather(Shape(t), i): needs only the gathered dims to be static."""
    idx = mg.const_value(node.inputs[1], depth + 1)
    shape = mg.shape(node.inputs[0].inputs[0].inputs[0])
    if idx is None or shape is None or int(node.attrs.get("axis", 0)) != 0:
        return None
    try:
        picked = np.asarray(shape, dtype=object)[idx.astype(np.int64)]
    except (IndexError, ValueError):
        return None
    flat = list(np.asarray(picked, dtype=object).reshape(-1))
    if not all(isinstance(d, (int, np.integer)) for d in flat):
        return None
    return np.asarray(np.asarray(picked, dtype=object).astype(np.int64))


def _fold_rest(mg: ModelGraph, node: ir.Node, depth: int) -> np.ndarray | None:
    op = node.op
    if op in ("Add", "Sub", "Mul", "Div"):
        if len(node.inputs) != 2:
            return None
        a = mg.const_value(node.inputs[0], depth + 1)
        b = mg.const_value(node.inputs[1], depth + 1)
        if a is None or b is None or a.size > 4096 or b.size > 4096 or a.dtype != b.dtype:
            return None
        with np.errstate(all="ignore"):
            if op == "Div":
                if a.dtype.kind in "iu":
                    return None  # integer division semantics differ; not needed here
                return np.divide(a, b)
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
    src = mg.const_value(node.inputs[0], depth + 1)
    if src is None or src.size > 1 << 22:
        return None
    try:
        if op == "Identity":
            return src
        if op == "CastLike" and len(node.inputs) == 2:
            to = mg.dtype(node.inputs[1])
            ok = to in FLOAT_TYPES and to != onnx.TensorProto.BFLOAT16 and src.dtype.kind in "fiu"
            return src.astype(np_dtype(to)) if ok else None  # type: ignore[arg-type]
        if op == "Neg":
            return None if src.dtype.kind not in "if" else np.negative(src)
        if op == "Cast":
            to = int(node.attrs.get("to", 0))
            if to not in FLOAT_TYPES or to == onnx.TensorProto.BFLOAT16 or src.dtype.kind not in "fiu":
                return None
            return src.astype(np_dtype(to))
        if op == "Flatten":
            axis = int(node.attrs.get("axis", 1))
            axis = axis + src.ndim if axis < 0 else axis
            outer = int(np.prod(src.shape[:axis])) if axis > 0 else 1
            return src.reshape(outer, -1)
        if op == "Reshape" and len(node.inputs) > 1:
            shape = mg.const_value(node.inputs[1], depth + 1)
            if shape is None or int(node.attrs.get("allowzero", 0)):
                return None
            dims = [int(d) for d in shape.reshape(-1)]
            dims = [src.shape[i] if d == 0 else d for i, d in enumerate(dims)]
            return src.reshape(dims)
        if op == "ReduceProd":
            if len(node.inputs) > 1 or ("axes" in node.attrs and src.ndim != 1):
                return None
            out = np.asarray(np.prod(src), dtype=src.dtype)
            return out if not int(node.attrs.get("keepdims", 1)) else out.reshape((1,) * src.ndim)
        if op in ("Unsqueeze", "Squeeze"):
            if len(node.inputs) > 1:
                axes_v = mg.const_value(node.inputs[1], depth + 1)
                axes = None if axes_v is None else [int(a) for a in axes_v.reshape(-1)]
            else:
                axes = [int(a) for a in node.attrs.get("axes", [])] or None
            if op == "Unsqueeze":
                if not axes:
                    return None
                out_rank = src.ndim + len(axes)
                return np.expand_dims(src, tuple(a + out_rank if a < 0 else a for a in axes))
            return np.squeeze(src, axis=None if axes is None else tuple(axes))
    except (ValueError, TypeError):
        return None
    return None


def derived_shape(mg: ModelGraph, tensor: ir.Tensor) -> tuple[Dim, ...] | None:
    """What shape inference could not say, from the producer: a Reshape's (shape-derived)
    target, a same-shape unary op's input, or the broadcast of an elementwise op's inputs."""
    p = mg.producer(tensor)
    if p is None or p.domain or not p.inputs:
        return None
    if p.op == "Reshape" and len(p.inputs) > 1:
        target = shapes.reshape_target(mg, p)
        if target is not None:
            return tuple(shapes.as_int(m) for m in target)
        length = mg.shape(p.inputs[1])  # at least the rank: the target's own length
        return (None,) * length[0] if length and len(length) == 1 and isinstance(length[0], int) else None
    if p.op in _SAME_SHAPE_UNARY:
        return mg.shape(p.inputs[0])
    if p.op in _LAYOUT_OPS:
        return _layout_shape(mg, p, tensor)
    if p.op not in _BROADCASTING:
        return None
    parts = [mg.shape(t) for t in p.inputs]
    if any(q is None for q in parts):
        return None
    rank = max(len(q) for q in parts)  # type: ignore[arg-type]
    out: list[Dim] = []
    for pos in range(rank, 0, -1):
        sizes = {q[-pos] for q in parts if len(q) >= pos}  # type: ignore[index, arg-type]
        out.append(_broadcast_dim(sizes))
    return tuple(out)


def _layout_shape(mg: ModelGraph, p: ir.Node, tensor: ir.Tensor) -> tuple[Dim, ...] | None:
    """Output shape of Transpose / Squeeze / Unsqueeze / MatMul / Gemm / Split from its input's."""
    src = mg.shape(p.inputs[0])
    if src is None:
        return None
    r = len(src)
    if p.op == "GlobalAveragePool":
        return (*src[:2], *([1] * (r - 2))) if r >= 3 else None
    if p.op == "Transpose":
        perm = p.attrs.get("perm") or list(range(r))[::-1]
        return tuple(src[int(i)] for i in perm) if len(perm) == r else None
    if p.op in ("MatMul", "Gemm"):
        w = mg.shape(p.inputs[1])
        if w is None or r < 1 or len(w) < 1 or (p.op == "Gemm" and (r != 2 or len(w) != 2)):
            return None
        if p.op == "Gemm":
            rows = src[1] if p.attrs.get("transA", 0) else src[0]
            return (rows, w[0] if p.attrs.get("transB", 0) else w[1])
        return (*src[:-1], w[-1]) if r >= 2 and len(w) == 2 else None
    axes = _int_list(mg, p, "axes" if p.op != "Split" else "split")
    if p.op == "Squeeze":
        if axes is None:
            return None
        drop = {a + r if a < 0 else a for a in axes}
        return tuple(d for i, d in enumerate(src) if i not in drop)
    if p.op == "Unsqueeze":
        if axes is None:
            return None
        n = r + len(axes)
        put = {a + n if a < 0 else a for a in axes}
        it = iter(src)
        return tuple(1 if i in put else next(it) for i in range(n))
    axis = int(p.attrs.get("axis", 0))  # Split
    axis = axis + r if axis < 0 else axis
    k = next((i for i, o in enumerate(p.outputs) if o is tensor), None)
    if k is None or not 0 <= axis < r:
        return None
    size: Dim = axes[k] if axes is not None and k < len(axes) else None
    if axes is None and isinstance(src[axis], int) and src[axis] % len(p.outputs) == 0:
        size = src[axis] // len(p.outputs)
    return (*src[:axis], size, *src[axis + 1 :])


def _int_list(mg: ModelGraph, node: ir.Node, attr: str) -> list[int] | None:
    """A list-of-ints argument given as an attribute (old opsets) or a constant second input."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = mg.const_value(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    value = node.attrs.get(attr)
    return None if value is None else [int(a) for a in value]


def _broadcast_dim(sizes: set[Dim]) -> Dim:
    """One broadcast dim: a static size > 1 wins over 1 and unknown (the others must be 1 or it);
    a symbolic size only when every input is known; 1 when all are 1."""
    ints = {d for d in sizes if isinstance(d, int) and d != 1}
    if ints:
        return ints.pop() if len(ints) == 1 else None
    if None in sizes:
        return None
    named = sizes - {1}
    return 1 if not named else named.pop() if len(named) == 1 else None


def _is_shape_gather(node: ir.Node) -> bool:
    src = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    return src is not None and src.op == "Shape"
