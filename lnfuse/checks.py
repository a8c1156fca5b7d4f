"""The checks a candidate passes before it is fused, as named steps that return a plan.

:meth:`lnfuse.rules.NormRule.check` runs them in order; each reads the graph and the candidate,
never changes either, and returns its part of the decision or the reason for a refusal (a str):

* :func:`types` - float input and output, not bfloat16;
* :func:`normalized_shape` - the normalized dims, from the input's shape and every constant's
  broadcast;
* :func:`variance_flags` - the variance is a mean (or an unbiased estimate, for layer norms);
* :func:`layout` - trailing axes, or a transpose into place;
* :func:`extent` - what the fused op reads and writes: x itself, the tensor before a 16-bit Cast
  island, or the original tensor around a Flatten/Reshape sandwich (ONNX function bodies);
* :func:`compute_type` - the dtype the fused op computes in and the Cast in front of it;
* :func:`side_outputs` - Mean / InvStdDev read outside the match (function bodies only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx

from lnfuse import ir, shapes
from lnfuse.graph import FLOAT_TYPES, ModelGraph, np_dtype
from lnfuse.matcher import Candidate
from lnfuse.symbolic import Flag, NormKind, equal_arrays

TP = onnx.TensorProto
SIXTEEN_BIT = (TP.FLOAT16, TP.BFLOAT16)


@dataclass(frozen=True)
class Extent:
    """What the fused op reads (``source``) and writes (``final``), and the nodes around the match
    it also replaces: a Cast island or Flatten in front (``prefix``), a Reshape back (``suffix``)."""

    source: ir.Tensor
    final: ir.Tensor
    prefix: tuple[ir.Node, ...] = ()
    suffix: tuple[ir.Node, ...] = ()


@dataclass(frozen=True)
class Layout:
    """Where the statistics sit: the fused op's ``axis``, the dims it normalizes, the Transpose
    into place (``perm``) and the coefficients on the normalized shape (float64)."""

    axis: int
    normalized_shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    scale: np.ndarray
    bias: np.ndarray | None


def types(mg: ModelGraph, kind: NormKind, cand: Candidate) -> tuple[int, int] | str:
    """(x's dtype, the output's dtype), both float and not bfloat16."""
    x = cand.x
    if kind is NormKind.RMS and is_centred(mg, x):
        # Real RMS norms (T5, LLaMA) never normalize x - mean: this is a layer-norm
        # look-alike (or a layer norm refused for a reason of its own); leave it.
        return f"input '{x.name}' is x - mean(...): a layer-norm look-alike, not an RMSNorm"
    xdt = mg.dtype(x)
    tdt = mg.dtype(cand.output)
    if xdt not in FLOAT_TYPES:
        return f"input '{x.name}' has a non-float or unknown type"
    if tdt not in FLOAT_TYPES:
        return f"output '{cand.output.name}' has a non-float or unknown type"
    if xdt == TP.BFLOAT16 or tdt == TP.BFLOAT16:
        return "bfloat16 normalizations are not rewritten yet"
    return xdt, tdt


def normalized_shape(mg: ModelGraph, cand: Candidate) -> tuple[tuple[int, ...], int | None] | str:
    """(the normalized dims, the input's rank or None). The input's shape is looked up only when
    the constants do not settle everything (shape inference over a big model is the expensive part)."""
    axes = cand.axes
    const_vals = [(c, mg.const_value(c)) for c in cand.const_inputs]
    needs_shape = cand.rank is None and any(v is not None and v.ndim > len(axes) for _, v in const_vals)
    covered = {a: any(v is not None and -a <= v.ndim and v.shape[a] > 1 for _, v in const_vals) for a in axes}
    shape = mg.shape(cand.x) if (needs_shape or not all(covered.values())) else None
    rank = len(shape) if shape is not None else cand.rank
    norm_dims: dict[int, int | None] = {}
    for a in axes:
        d = shape[a] if shape is not None and -a <= len(shape) else None
        norm_dims[a] = d if isinstance(d, int) else None
    for c, val in const_vals:
        if val is not None:
            why = _broadcast_into(c, val.shape, val.size, rank, axes, norm_dims)
            if why is not None:
                return why
    if any(v is None for v in norm_dims.values()):
        return "normalized dims are unknown (dynamic hidden size and no full-size scale)"
    return tuple(int(norm_dims[a]) for a in axes), rank  # type: ignore[arg-type]


def _broadcast_into(
    c: ir.Tensor,
    cshape: tuple[int, ...],
    size: int,
    rank: int | None,
    axes: tuple[int, ...],
    norm_dims: dict[int, int | None],
) -> str | None:
    """Fold one constant's shape into ``norm_dims`` (updated in place, the caller's own dict);
    a reason when it broadcasts the input or disagrees with it."""
    if rank is not None and len(cshape) > rank:
        return f"constant '{c.name}' {list(cshape)} has a higher rank than the input"
    if rank is None and len(cshape) > len(axes) and any(d != 1 for d in cshape[: len(cshape) - len(axes)]):
        return f"constant '{c.name}' {list(cshape)} may broadcast the input (rank unknown)"
    if rank is None and len(cshape) > len(axes) and size > 1:
        return f"constant '{c.name}' {list(cshape)}: input rank unknown"
    for pos in range(-1, -len(cshape) - 1, -1):
        d = int(cshape[pos])
        if pos not in norm_dims:
            if d != 1:
                return f"constant '{c.name}' {list(cshape)} varies along axis {pos}, which is not normalized"
            continue
        known = norm_dims[pos]
        if d == 1:
            continue
        if known is None:
            norm_dims[pos] = d
        elif known != d:
            return f"constant '{c.name}' {list(cshape)} does not match the input's dim {known} at {pos}"
    return None


def variance_flags(kind: NormKind, cand: Candidate, n: int, xdt: int) -> frozenset[Flag] | str:
    """The flags the variance adds (none for a mean, ``UNBIASED`` for N / (N - 1) in a layer
    norm), or the reason it is neither. The factor ``k`` is matched as far as a ``1/N`` (or
    ``N/(N-1)``) stored in x's type can be: fp16 rounds 1/5 to 0.19995. Any ``k`` the check lets
    through is exact: the scale carries ``k ** -0.5`` and the epsilon is ``eps / k``."""
    k = cand.form.edef.k
    tol = _FACTOR_TOLERANCE.get(xdt, 1e-6)
    unbiased = abs(k - n / (n - 1)) if n > 1 and kind is NormKind.LN else float("inf")
    if unbiased <= tol * k and unbiased < abs(k - 1.0):  # the nearer of the two (fp16, N > 1024)
        return frozenset({Flag.UNBIASED})
    if abs(k - 1.0) <= tol:
        return frozenset()
    if Flag.REDUCE_SUM in cand.flags:
        return f"variance is a sum over {n} elements, not a mean (ReduceSum instead of ReduceMean?)"
    return f"variance is scaled by {k:.6g}: neither a mean nor an unbiased estimate"


# How far N * fl(1/N) may be from 1 when the constant is stored in a 16-bit float (half an ulp of
# fp16 is 2**-11 of the value; twice that for margin). Wider types keep the 1e-6 of float32.
_FACTOR_TOLERANCE = {TP.FLOAT16: 2.0**-10}


def layout(
    cand: Candidate, norm_shape: tuple[int, ...], rank: int | None, allow_transpose: bool
) -> Layout | str:
    """Trailing axes, or transposed into place (rank known, transposes allowed)."""
    axes = cand.axes
    k_axes = len(axes)
    perm: tuple[int, ...] | None = None
    if axes == tuple(range(-k_axes, 0)):
        axis = rank - k_axes if cand.axes_positive and rank is not None else -k_axes
    else:
        if rank is None:
            return "statistics over non-trailing axes and the input rank is unknown"
        if not allow_transpose:
            return f"statistics over non-trailing axes {list(axes)} (transposes disabled)"
        pos_axes = [a + rank for a in axes]
        perm = tuple([i for i in range(rank) if i not in pos_axes] + pos_axes)
        axis = -k_axes
    form = cand.form
    scale = on_norm(form.scale, norm_shape, axes)
    bias = on_norm(form.bias, norm_shape, axes) if form.bias is not None else None
    return Layout(axis, norm_shape, perm, scale, bias)


def on_norm(coef: np.ndarray, norm_shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """A coefficient (float64) on the normalized shape."""
    arr = np.asarray(coef, dtype=np.float64)
    if arr.shape == norm_shape and arr.flags.c_contiguous:
        return arr
    width = max(arr.ndim, -min(axes))
    arr = arr.reshape((1,) * (width - arr.ndim) + arr.shape)
    keep = [width + a for a in axes]
    squeeze = tuple(i for i in range(width) if i not in keep)
    arr = arr.squeeze(axis=squeeze) if squeeze else arr
    return np.ascontiguousarray(np.broadcast_to(arr, norm_shape))


def extent(
    mg: ModelGraph, cand: Candidate, xdt: int, tdt: int, lay: Layout
) -> tuple[Extent, Layout, bool] | str:
    """(what the fused op reads and writes, the layout on it, whether a sandwich was undone)."""
    x, src = cand.x, mg.producer(cand.x)
    found = sandwich(mg, cand)
    if isinstance(found, str):
        return found
    if found is not None:
        x0, prefix, suffix, final, j_axes = found
        x0_shape = mg.shape(x0)
        if x0_shape is None or any(not isinstance(x0_shape[a], int) for a in j_axes):
            return "normalized dims of the reshaped input are not static"
        new_shape = tuple(int(x0_shape[a]) for a in j_axes)  # type: ignore[arg-type]
        if math.prod(new_shape) != math.prod(lay.normalized_shape):
            return "reshaped rows do not line up with the input's trailing axes (GroupNorm-like)"
        bias = lay.bias.reshape(new_shape) if lay.bias is not None else None
        lay = Layout(-len(new_shape), new_shape, None, lay.scale.reshape(new_shape), bias)
        tdt_final = mg.dtype(final)
        if tdt_final not in FLOAT_TYPES or tdt_final == TP.BFLOAT16:
            return f"output '{final.name}' has an unsupported type"
        ext = Extent(x0, final, tuple(prefix), tuple(suffix))
    elif src is not None and (
        _noop_cast(mg, src, x, cand)  # Cast(s, to=s's own type): read s
        # A 16-bit Cast island: read the 16-bit tensor directly when the result goes back to it.
        or (src.op == "Cast" and xdt == TP.FLOAT and mg.dtype(src.inputs[0]) == tdt and tdt in SIXTEEN_BIT)
        # x is read through several identical Casts of one source: the fused op reads the
        # source (cast once in front of it), so no copy of x is left behind.
        or cand.x_aliases
    ):
        ext = Extent(src.inputs[0], cand.output, (src,))
    else:
        ext = Extent(x, cand.output)
    if cand.x_aliases and ext.prefix and ext.prefix[-1] is src:
        ext = replace(ext, prefix=(*ext.prefix, *cand.x_aliases))
    return ext, lay, found is not None


def compute_type(
    mg: ModelGraph, cand: Candidate, ext: Extent, xdt: int, lay: Layout
) -> tuple[int, int | None, Extent]:
    """(the dtype the fused op computes in, the Cast in front of it, the extent after that choice).

    In the source's dtype when the coefficients fit it exactly and the result is wanted in that
    dtype; otherwise in x's dtype (with Casts around)."""
    src_dt = mg.dtype(ext.source)
    if ext.source is cand.x:
        return xdt, None, ext
    # The result is wanted in the source's (16-bit) type anyway, so Scale/B rounded to it cost
    # at most about one unit in the last place of the output; they must stay finite.
    if (
        src_dt == mg.dtype(ext.final)
        and src_dt in FLOAT_TYPES
        and src_dt != TP.BFLOAT16
        and fits(lay.scale, src_dt)
        and (lay.bias is None or fits(lay.bias, src_dt))
    ):
        return src_dt, None, ext  # type: ignore[return-value]
    if src_dt != xdt:
        if not ext.suffix and not cand.x_aliases:  # a 16-bit island that does not fit: keep x
            return xdt, None, Extent(cand.x, ext.final)
        return xdt, xdt, ext
    return xdt, None, ext


def side_outputs(
    mg: ModelGraph, cand: Candidate, ext: Extent, unflattened: bool, stash_dt: int, axis: int
) -> tuple[int | None, tuple[str, ...]] | str:
    """(the Flatten axis the side outputs are restored at, the kinds served directly), or why not.

    Mean / InvStdDev read outside the match: only an ONNX function expansion (a Flatten
    sandwich) gets them from LayerNormalization's own optional outputs; anywhere else the
    intermediate is left alone, as the user's graph asked for it."""
    if not cand.side_outputs:
        return None, ()
    kind0, t0 = cand.side_outputs[0]
    flatten = ext.prefix[0] if ext.prefix and ext.prefix[0].op == "Flatten" else None
    if not unflattened or flatten is None:
        return f"intermediate '{t0.name}' (the {kind0}) is read outside the match"
    for kind, t in cand.side_outputs:
        if mg.dtype(t) != stash_dt:
            return f"the {kind} '{t.name}' is read outside the match in a type the fused op cannot give"
    return int(flatten.attrs.get("axis", 1)), direct_side_reshapes(mg, cand, ext.source, axis)


def coefficients(lay: Layout, dtype: int) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Scale and B in the fused op's dtype (exact when they fit it), finite."""
    scale = exactly(lay.scale, dtype)
    if scale is None:
        scale = lay.scale.astype(np_dtype(dtype))
    bias = None
    if lay.bias is not None:
        bias = exactly(lay.bias, dtype)
        if bias is None:
            bias = lay.bias.astype(np_dtype(dtype))
    if not np.isfinite(scale).all() or (bias is not None and not np.isfinite(bias).all()):
        return "scale or bias does not fit the fused op's dtype"
    return scale, bias


def pattern_label(cand: Candidate, mg: ModelGraph, flags: set[str] | frozenset[str]) -> str:
    """A short human name for the way this normalization was written (``flags`` as decided by check)."""
    ops = [n.op for n in cand.nodes]
    if Flag.UNFLATTENED in flags:
        return "function-expanded" if Flag.ONE_PASS in flags else "reshaped"
    if cand.form.kind is NormKind.RMS:
        base = "rmsnorm"
    elif Flag.ONE_PASS in flags:
        base = "one-pass-variance"
    elif Flag.UNBIASED in flags:
        base = "unbiased-variance"
    elif any(n.op == "Mul" and any(t is cand.x for t in n.inputs) for n in cand.nodes):
        base = "keras"
    else:
        square = (
            "mul-square"
            if any(n.op == "Mul" and n.inputs[0] is n.inputs[1] for n in cand.nodes)
            else "pow-square"
        )
        if "Reciprocal" in ops:
            denom = "reciprocal"
        elif any(
            n.op == "Pow" and n.inputs[0] is not n.inputs[1] and _pow_exp(mg, n) in (-0.5, 0.5)
            for n in cand.nodes
        ):
            denom = "pow-rsqrt"
        elif "Sqrt" in ops and "Div" in ops:
            denom = "sqrt-div"
        else:
            denom = "other"
        base = "pytorch" if (square, denom) == ("pow-square", "sqrt-div") else f"{square}/{denom}"
    if "Cast" in ops or _is_cast(mg, cand.x):
        base += "+casts"
    return base


def _pow_exp(mg: ModelGraph, node: ir.Node) -> float | None:
    v = mg.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if v is None or v.size != 1:
        return None
    return float(np.asarray(v).reshape(-1)[0])


def _is_cast(mg: ModelGraph, t: ir.Tensor) -> bool:
    p = mg.producer(t)
    return p is not None and p.op == "Cast"


def exactly(values: np.ndarray, elem_type: int) -> np.ndarray | None:
    """``values`` (float64) in ``elem_type`` if no value changes, else None."""
    if elem_type == TP.BFLOAT16:
        return None
    arr = values.astype(np_dtype(elem_type))
    if not np.array_equal(arr.astype(np.float64), values):
        return None
    return arr


def fits(values: np.ndarray, elem_type: int) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.all(np.isfinite(values.astype(np_dtype(elem_type)))))


def sandwich(
    mg: ModelGraph, cand: Candidate
) -> tuple[ir.Tensor, list[ir.Node], list[ir.Node], ir.Tensor, tuple[int, ...]] | str | None:
    """Detect ``x0 -> Flatten/Reshape -> [Cast] -> norm -> Reshape(.., shape of x0)``.

    Returns ``(x0, prefix, suffix, final, x0_axes)``, a refusal reason, or None when
    there is no sandwich (the norm over the reshaped view is then fused as it is).
    """
    prefix: list[ir.Node] = []
    t = cand.x
    p = mg.producer(t)
    if p is not None and p.op == "Cast" and p.inputs:
        prefix.insert(0, p)
        t = p.inputs[0]
        p = mg.producer(t)
    if p is None or p.op not in ("Flatten", "Reshape") or p.domain:
        return None
    x0 = p.inputs[0]
    prefix.insert(0, p)
    outs = cand.output.outputs
    if len(outs) != 1 or outs[0].op != "Reshape" or mg.is_graph_output(cand.output):
        return None
    back = outs[0]
    if back.inputs[0] is not cand.output or len(back.inputs) < 2:
        return None
    shape_src = mg.producer(back.inputs[1])
    x0_shape = mg.shape(x0)
    suffix = [back]
    if (
        shape_src is not None
        and shape_src.op == "Shape"
        and shape_src.inputs[0] is x0
        and not shape_src.attrs.get("start")
        and shape_src.attrs.get("end") is None
    ):
        suffix = [shape_src, back]
    else:
        target = mg.const_value(back.inputs[1])
        if target is None or x0_shape is None or not all(isinstance(d, int) for d in x0_shape):
            return None
        if [int(v) for v in target.reshape(-1)] != list(x0_shape):
            return None
    view_rank = len(mg.shape(cand.x) or ()) or None
    if p.op == "Flatten":
        if cand.axes != (-1,):
            return None
        k = int(p.attrs.get("axis", 1))
        if k < 0:
            return x0, prefix, suffix, back.outputs[0], tuple(range(k, 0))
        if x0_shape is None:
            return "Flatten of an input of unknown rank"
        r = len(x0_shape)
        return x0, prefix, suffix, back.outputs[0], tuple(range(k - r, 0))
    # Reshape: rows must be a suffix of x0's axes.
    if x0_shape is None or not all(isinstance(d, int) for d in x0_shape) or view_rank is None:
        return "statistics over a reshaped view of an input with dynamic shape (GroupNorm-like?)"
    view_shape = mg.shape(cand.x)
    assert view_shape is not None
    if not all(isinstance(d, int) for d in view_shape):
        return "statistics over a reshaped view with dynamic dims"
    n = int(np.prod([view_shape[a] for a in cand.axes]))  # type: ignore[misc]
    if cand.axes != tuple(range(-len(cand.axes), 0)):
        return None
    r = len(x0_shape)
    for j in range(r):
        if int(np.prod(x0_shape[j:])) == n:  # type: ignore[arg-type]
            return x0, prefix, suffix, back.outputs[0], tuple(range(j - r, 0))
    return "reshaped rows regroup the input's axes (GroupNorm-like), not a layer norm of the input"


def direct_side_reshapes(mg: ModelGraph, cand: Candidate, source: ir.Tensor, axis: int) -> tuple[str, ...]:
    """Side outputs whose one reader is ``Reshape(t, shape)`` with ``shape`` equal (for any value of
    the dynamic dims) to LayerNormalization's Mean / InvStdDev shape for the source: ``x0.shape`` with
    the normalized axes set to 1. ONNX's function body computes that shape from Shape / Size / Slice /
    Sub / ConstantOfShape / Concat."""
    x_shape = shapes.shape_of(mg, source)
    if x_shape is None:
        return ()
    rank = len(x_shape)
    first = axis + rank if axis < 0 else axis
    want = x_shape[:first] + [shapes.ONE] * (rank - first)
    out = []
    inside = {id(n) for n in (*cand.nodes, *cand.side_nodes)}
    for kind, t in cand.side_outputs:
        readers = [c for c in t.outputs if id(c) not in inside]
        if mg.is_graph_output(t) or len(readers) != 1:
            continue
        r = readers[0]
        if r.op != "Reshape" or r.domain or r.inputs[0] is not t or len(r.inputs) < 2:
            continue
        if int(r.attrs.get("allowzero", 0)) or shapes.dims(mg, r.inputs[1]) != want:
            continue
        out.append(kind)
    return tuple(out)


def _noop_cast(mg: ModelGraph, src: ir.Node | None, x: ir.Tensor, cand: Candidate) -> bool:
    """``x = Cast(s, to=type of s)`` and only the match reads ``x``: the Cast changes nothing."""
    if src is None or src.op != "Cast" or src.domain or not src.inputs or mg.is_graph_output(x):
        return False
    inside = {id(n) for n in cand.nodes}
    same = mg.dtype(src.inputs[0]) == mg.dtype(x) and mg.dtype(x) in FLOAT_TYPES
    return same and all(id(c) in inside for c in x.outputs)


def _through(mg: ModelGraph, t: ir.Tensor) -> ir.Node | None:
    """Producer of ``t``, looking through Identity and Cast."""
    p = mg.producer(t)
    for _ in range(4):
        if p is None or p.op not in ("Identity", "Cast") or not p.inputs:
            break
        p = mg.producer(p.inputs[0])
    return p


def is_centred(mg: ModelGraph, t: ir.Tensor) -> bool:
    """``t`` is ``a - Reduce*(...)``: a centred value."""
    p = _through(mg, t)
    if p is None or p.op != "Sub" or len(p.inputs) != 2:
        return False
    q = _through(mg, p.inputs[1])
    return q is not None and q.op in ("ReduceMean", "ReduceSum", "GlobalAveragePool")


def reusable(mg: ModelGraph, cand: Candidate, arr: np.ndarray | None) -> str | None:
    """Name of an original initializer that already holds exactly ``arr`` (so its name survives)."""
    if arr is None:
        return None
    for c in cand.const_inputs:
        if not isinstance(c, ir.Constant):
            continue
        val = mg.const_value(c)
        if val is not None and val.dtype == arr.dtype and val.shape == arr.shape and equal_arrays(val, arr):
            return c.name
    return None
