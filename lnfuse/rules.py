"""The rule contract (pattern / check / rewrite) and the shared normalization rule.

A rule is a small object:

* ``pattern(mg)``: the candidates of this rule in the model (snapshotted from the
  op-type index before anything is rewritten) and the refusals the matcher
  already knows about;
* ``check(mg, candidate)``: either a frozen :class:`NormParams` (epsilon, axis,
  stash_type, scale, bias, ...) or a :class:`~lnfuse.matcher.Refusal` whose
  reason ``--explain`` prints;
* ``rewrite(mg, candidate, params)``: schedule the fused node(s) in place of the match.

:class:`NormRule` implements all three for ``LayerNormalization`` (opset >= 17:
``y = (x - mean) / sqrt(var + eps) * Scale + B`` over axes ``[axis, rank)``) and
``RMSNormalization`` (opset >= 23: ``y = x / sqrt(mean(x**2) + eps) * Scale``).
Scale and B are emitted with the normalized shape (``x.shape[axis:]``), in the
dtype of the tensor the fused op reads; ``stash_type`` is 1 (float32 statistics)
except for float64 inputs (11). Statistics over non-trailing axes are rewritten
as ``Transpose -> norm -> Transpose`` when the rank is known.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from lnfuse import ir, shapes
from lnfuse.graph import FLOAT_TYPES, ModelGraph, node_label, np_dtype
from lnfuse.matcher import Candidate, Refusal, Walker
from lnfuse.symbolic import NormKind, equal_arrays

TP = onnx.TensorProto
SIXTEEN_BIT = (TP.FLOAT16, TP.BFLOAT16)


@dataclass(frozen=True)
class AnchorNote:
    """Why the walk from one anchor found no normalization (for ``--explain``)."""

    anchor: str
    reason: str


@dataclass(frozen=True)
class NormParams:
    """Everything the rewrite needs, decided by ``check``."""

    op: str  # "LayerNormalization" or "RMSNormalization"
    epsilon: float
    axis: int
    stash_type: int
    normalized_shape: tuple[int, ...]
    scale: np.ndarray  # in the fused op's dtype, shape == normalized_shape
    bias: np.ndarray | None
    dtype: int  # element type the fused op reads and writes
    read_source: bool  # True: the fused op reads the tensor *before* x's Cast (16-bit island)
    out_cast: int | None  # Cast the fused output to this type, if it differs
    perm: tuple[int, ...] | None  # Transpose before (and inverse after) for non-trailing axes
    pattern: str
    flags: frozenset[str]
    pre_cast: int | None = None  # Cast the source to this type before the norm
    side_flatten_axis: int | None = None  # Mean/InvStdDev outputs reused, flattened back at this axis
    # Kinds ("mean", "inv_std") whose only reader is a Reshape to the op's own Mean/InvStdDev shape:
    # that Reshape's output comes straight from the fused op (no Flatten, no Reshape).
    side_direct: tuple[str, ...] = ()
    scale_source: str | None = None  # name of an original initializer reused as Scale
    bias_source: str | None = None


def pattern_label(cand: Candidate, mg: ModelGraph, flags: set[str] | frozenset[str]) -> str:
    """A short human name for the way this normalization was written (``flags`` as decided by check)."""
    ops = [n.op for n in cand.nodes]
    if "unflattened" in flags:
        return "function-expanded" if "one_pass" in flags else "reshaped"
    if cand.form.kind is NormKind.RMS:
        base = "rmsnorm"
    elif "one_pass" in flags:
        base = "one-pass-variance"
    elif "unbiased" in flags:
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


def _exactly(values: np.ndarray, elem_type: int) -> np.ndarray | None:
    """``values`` (float64) in ``elem_type`` if no value changes, else None."""
    if elem_type == TP.BFLOAT16:
        return None
    arr = values.astype(np_dtype(elem_type))
    if not np.array_equal(arr.astype(np.float64), values):
        return None
    return arr


def _fits(values: np.ndarray, elem_type: int) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.all(np.isfinite(values.astype(np_dtype(elem_type)))))


class NormRule:
    """Fuses one kind of normalization."""

    def __init__(self, kind: NormKind) -> None:
        self.kind = NormKind(kind)
        self.op = "LayerNormalization" if self.kind is NormKind.LN else "RMSNormalization"
        self.min_opset = 17 if self.kind is NormKind.LN else 23

    # -- pattern ------------------------------------------------------------------
    def pattern(self, mg: ModelGraph) -> Iterator[Candidate | Refusal | AnchorNote]:
        walker = Walker(mg)
        claimed: dict[int, int | None] = {}  # node id -> group of the candidate that took it
        said: list[tuple[object, Refusal | AnchorNote]] = []
        for x, axes, rank, anchor, positive, views in walker.proposals(self.kind):
            res = walker.walk(x, axes, rank, anchor, positive, views)
            for cand in res.candidates:
                if cand.form.kind != self.kind:
                    continue
                if any(id(n) in claimed and claimed[id(n)] != cand.group for n in cand.nodes) or (
                    cand.group is None and any(id(n) in claimed for n in cand.nodes)
                ):
                    continue
                claimed.update((id(n), cand.group) for n in cand.nodes)
                yield cand
            if self.kind is NormKind.LN:
                said.extend((anchor, r) for r in res.refusals)
            if res.note:
                said.append((anchor, AnchorNote(node_label(anchor), res.note)))
        # An anchor is walked as itself and, when it reads a reshaped view, as that view: what a
        # walk that found nothing says only counts when no walk of that anchor found a norm.
        yield from (item for anchor, item in said if id(anchor) not in claimed)

    # -- check ---------------------------------------------------------------------
    def check(self, mg: ModelGraph, cand: Candidate, *, allow_transpose: bool = True) -> NormParams | Refusal:
        def refuse(reason: str) -> Refusal:
            view = cand.view
            return Refusal(
                reason=reason,
                nodes=[node_label(n) for n in cand.nodes],
                anchor=node_label(cand.nodes[-1]),
                graph=view.path,
            )

        form = cand.form
        x = cand.x
        if self.kind is NormKind.RMS and _is_centred(mg, x):
            # Real RMS norms (T5, LLaMA) never normalize x - mean: this is a layer-norm
            # look-alike (or a layer norm refused for a reason of its own); leave it.
            return refuse(f"input '{x.name}' is x - mean(...): a layer-norm look-alike, not an RMSNorm")
        xdt = mg.dtype(x)
        tdt = mg.dtype(cand.output)
        if xdt not in FLOAT_TYPES:
            return refuse(f"input '{x.name}' has a non-float or unknown type")
        if tdt not in FLOAT_TYPES:
            return refuse(f"output '{cand.output.name}' has a non-float or unknown type")
        if xdt == TP.BFLOAT16 or tdt == TP.BFLOAT16:
            return refuse("bfloat16 normalizations are not rewritten yet")

        # Shapes: the normalized dims and every constant's broadcast.
        # The input's shape is looked up only when the constants do not settle everything
        # (shape inference over a whole big model is the expensive part of a lookup).
        axes = cand.axes
        const_vals = [(c, mg.const_value(c)) for c in cand.const_inputs]
        needs_shape = cand.rank is None and any(v is not None and v.ndim > len(axes) for _, v in const_vals)
        covered = {a: False for a in axes}
        for _, v in const_vals:
            if v is not None:
                for a in axes:
                    if -a <= v.ndim and v.shape[a] > 1:
                        covered[a] = True
        shape = mg.shape(x) if (needs_shape or not all(covered.values())) else None
        rank = len(shape) if shape is not None else cand.rank
        norm_dims: dict[int, int | None] = {}
        for a in axes:
            d = shape[a] if shape is not None and -a <= len(shape) else None
            norm_dims[a] = d if isinstance(d, int) else None
        for c, val in const_vals:
            if val is None:
                continue
            cshape = val.shape
            if rank is not None and len(cshape) > rank:
                return refuse(f"constant '{c.name}' {list(cshape)} has a higher rank than the input")
            if (
                rank is None
                and len(cshape) > len(axes)
                and any(d != 1 for d in cshape[: len(cshape) - len(axes)])
            ):
                return refuse(f"constant '{c.name}' {list(cshape)} may broadcast the input (rank unknown)")
            if rank is None and len(cshape) > len(axes) and val.size > 1:
                return refuse(f"constant '{c.name}' {list(cshape)}: input rank unknown")
            for pos in range(-1, -len(cshape) - 1, -1):
                d = int(cshape[pos])
                if pos not in norm_dims:
                    if d != 1:
                        return refuse(
                            f"constant '{c.name}' {list(cshape)} varies along axis {pos}, which is not normalized"
                        )
                    continue
                known = norm_dims[pos]
                if d == 1:
                    continue
                if known is None:
                    norm_dims[pos] = d
                elif known != d:
                    return refuse(
                        f"constant '{c.name}' {list(cshape)} does not match the input's dim {known} at {pos}"
                    )
        if any(v is None for v in norm_dims.values()):
            return refuse("normalized dims are unknown (dynamic hidden size and no full-size scale)")
        normalized_shape = tuple(int(norm_dims[a]) for a in axes)  # type: ignore[arg-type]
        n = math.prod(int(d) for d in normalized_shape)

        # Variance scaling: mean (k == 1) or unbiased N / (N - 1); anything else is not a norm.
        k = form.edef.k
        flags = set(cand.flags)
        if abs(k - 1.0) > 1e-6:
            if n > 1 and abs(k - n / (n - 1)) <= 1e-6 * k and self.kind is NormKind.LN:
                flags.add("unbiased")
            elif "reduce_sum" in cand.flags:
                return refuse(
                    f"variance is a sum over {n} elements, not a mean (ReduceSum instead of ReduceMean?)"
                )
            else:
                return refuse(f"variance is scaled by {k:.6g}: neither a mean nor an unbiased estimate")
        eps = form.edef.eps
        if not np.isfinite(eps) or eps < 0:
            return refuse(f"epsilon {eps} is negative or not finite")

        # Axes: trailing, or transposed into place.
        k_axes = len(axes)
        trailing = axes == tuple(range(-k_axes, 0))
        perm: tuple[int, ...] | None = None
        if trailing:
            axis = -k_axes
            if cand.axes_positive and rank is not None:
                axis = rank - k_axes
        else:
            if rank is None:
                return refuse("statistics over non-trailing axes and the input rank is unknown")
            if not allow_transpose:
                return refuse(f"statistics over non-trailing axes {list(axes)} (transposes disabled)")
            pos_axes = [a + rank for a in axes]
            perm = tuple([i for i in range(rank) if i not in pos_axes] + pos_axes)
            axis = -k_axes
            flags.add("transposed")

        # Coefficients on the normalized shape.
        def on_norm(coef: np.ndarray) -> np.ndarray:
            arr = np.asarray(coef, dtype=np.float64)
            if arr.shape == normalized_shape and arr.flags.c_contiguous:
                return arr
            width = max(arr.ndim, -min(axes))
            arr = arr.reshape((1,) * (width - arr.ndim) + arr.shape)
            keep = [width + a for a in axes]
            squeeze = tuple(i for i in range(width) if i not in keep)
            arr = arr.squeeze(axis=squeeze) if squeeze else arr
            return np.ascontiguousarray(np.broadcast_to(arr, normalized_shape))

        scale64 = on_norm(form.scale)
        bias64 = on_norm(form.bias) if form.bias is not None else None

        # A Flatten/Reshape sandwich around the statistics (ONNX function expansion):
        # normalize the original tensor directly when the rows are a suffix of its axes.
        tdt_final = tdt
        cand.source, cand.final, cand.prefix, cand.suffix = x, cand.output, [], []
        sandwich = _sandwich(mg, cand)
        if isinstance(sandwich, str):
            return refuse(sandwich)
        if sandwich is not None:
            x0, prefix, suffix, final, j_axes = sandwich
            x0_shape = mg.shape(x0)
            if x0_shape is None or any(not isinstance(x0_shape[a], int) for a in j_axes):
                return refuse("normalized dims of the reshaped input are not static")
            new_shape = tuple(int(x0_shape[a]) for a in j_axes)  # type: ignore[arg-type]
            if int(np.prod(new_shape)) != n:
                return refuse("reshaped rows do not line up with the input's trailing axes (GroupNorm-like)")
            scale64 = scale64.reshape(new_shape)
            bias64 = bias64.reshape(new_shape) if bias64 is not None else None
            normalized_shape, axis, perm = new_shape, -len(new_shape), None
            cand.source, cand.final, cand.prefix, cand.suffix = x0, final, prefix, suffix
            tdt_final = mg.dtype(final)
            if tdt_final not in FLOAT_TYPES or tdt_final == TP.BFLOAT16:
                return refuse(f"output '{final.name}' has an unsupported type")
            flags.add("unflattened")
        else:
            # A 16-bit Cast island: read the 16-bit tensor directly when the result goes back to it.
            src = mg.producer(x)
            if _noop_cast(mg, src, x, cand):
                cand.source, cand.prefix = src.inputs[0], [src]  # Cast(x, to=x's own type): read x
            elif (
                src is not None
                and src.op == "Cast"
                and xdt == TP.FLOAT
                and mg.dtype(src.inputs[0]) == tdt
                and tdt in SIXTEEN_BIT
            ):
                cand.source, cand.prefix = src.inputs[0], [src]
            elif cand.x_aliases and src is not None:
                # x is read through several identical Casts of one source: the fused op reads
                # the source (cast once in front of it), so no copy of x is left behind.
                cand.source, cand.prefix = src.inputs[0], [src]
        if cand.x_aliases and cand.prefix and cand.prefix[-1] is mg.producer(x):
            cand.prefix = [*cand.prefix, *cand.x_aliases]

        # Types: the fused op computes in the source's dtype when the coefficients fit it exactly
        # and the result is wanted in that dtype; otherwise in x's dtype (with Casts around).
        src_dt = mg.dtype(cand.source)
        dtype = xdt
        pre_cast: int | None = None
        if cand.source is not x:
            # The result is wanted in the source's (16-bit) type anyway, so Scale/B rounded to it
            # cost at most about one unit in the last place of the output; they must stay finite.
            if (
                src_dt == tdt_final
                and src_dt in FLOAT_TYPES
                and src_dt != TP.BFLOAT16
                and _fits(scale64, src_dt)
                and (bias64 is None or _fits(bias64, src_dt))
            ):
                dtype = src_dt
            elif src_dt != xdt:
                if not cand.suffix and not cand.x_aliases:  # a 16-bit island that does not fit: keep x
                    cand.source, cand.prefix = x, []
                else:
                    pre_cast = xdt
        read_source = cand.source is not x
        scale = _exactly(scale64, dtype)
        if scale is None:
            scale = scale64.astype(np_dtype(dtype))
        bias = None
        if bias64 is not None:
            bias = _exactly(bias64, dtype)
            if bias is None:
                bias = bias64.astype(np_dtype(dtype))
        if not np.isfinite(scale).all() or (bias is not None and not np.isfinite(bias).all()):
            return refuse("scale or bias does not fit the fused op's dtype")

        # Mean / InvStdDev read outside the match: only an ONNX function expansion (a Flatten
        # sandwich) gets them from LayerNormalization's own optional outputs; anywhere else the
        # intermediate is left alone, as the user's graph asked for it.
        side_axis: int | None = None
        side_direct: tuple[str, ...] = ()
        if cand.side_outputs:
            kind0, t0 = cand.side_outputs[0]
            flatten = cand.prefix[0] if cand.prefix and cand.prefix[0].op == "Flatten" else None
            if "unflattened" not in flags or flatten is None:
                return refuse(f"intermediate '{t0.name}' (the {kind0}) is read outside the match")
            stash_dt = TP.DOUBLE if (dtype == TP.DOUBLE and xdt == TP.DOUBLE) else TP.FLOAT
            for kind, t in cand.side_outputs:
                if mg.dtype(t) != stash_dt:
                    return refuse(
                        f"the {kind} '{t.name}' is read outside the match in a type the fused op cannot give"
                    )
            side_axis = int(flatten.attrs.get("axis", 1))
            side_direct = _direct_side_reshapes(mg, cand, axis)
            flags.add("mean_invstd_reused")
        if dtype == TP.DOUBLE and xdt == TP.DOUBLE:
            # stash_type may only be float or bfloat16: a stash_type=11 node is not standard ONNX
            # (onnx.reference refuses it), and float32 statistics would not reproduce fp64 ones.
            return refuse(
                "float64 statistics: the standard op computes them in float32 or bfloat16 only "
                "(stash_type=11 is not ONNX), so a float64 norm is left as it is"
            )
        if "fp16_square" in flags:
            flags.add("fp16_overflow_prone")
        return NormParams(
            op=self.op,
            epsilon=float(np.float32(eps)),
            axis=axis,
            # Statistics in the precision the original computed them in: float64 only when x
            # itself was float64 (an fp64 model's stash Cast to float keeps stash_type=1).
            stash_type=11 if (dtype == TP.DOUBLE and xdt == TP.DOUBLE) else 1,
            normalized_shape=normalized_shape,
            scale=scale,
            bias=bias,
            dtype=dtype,
            read_source=read_source,
            out_cast=None if tdt_final == dtype else tdt_final,
            pre_cast=pre_cast,
            side_flatten_axis=side_axis,
            side_direct=side_direct,
            perm=perm,
            pattern=pattern_label(cand, mg, flags),
            flags=frozenset(flags),
            scale_source=_reusable(mg, cand, scale),
            bias_source=_reusable(mg, cand, bias) if bias is not None else None,
        )

    # -- rewrite -------------------------------------------------------------------
    def build(
        self,
        params: NormParams,
        inp: ir.Tensor,
        out: ir.Tensor,
        name: callable,  # type: ignore[valid-type]
        scale_t: ir.Tensor | None = None,
        bias_t: ir.Tensor | None = None,
        side: list[tuple[str, ir.Tensor]] | None = None,
        keep_back: bool = True,
    ) -> list[ir.Node]:
        """The fused node(s) reading ``inp`` and producing ``out`` (and ``side`` Mean/InvStdDev tensors).

        ``keep_back=False``: no Transpose back after a transposed norm (the caller found one that
        undoes it and removes both)."""
        nodes: list[ir.Node] = []

        def step(
            op: str, attrs: dict[str, object], src: ir.Tensor, dst: ir.Tensor | None, dtype: int
        ) -> ir.Tensor:
            """Append ``op(src) -> dst`` (a fresh tensor of ``dtype`` when ``dst`` is None)."""
            dst = dst if dst is not None else ir.Variable(name(f"lnfuse_{op.lower()}"), dtype=np_dtype(dtype))
            nodes.append(ir.Node(op, name(f"lnfuse/{op}"), attrs, [src], [dst]))
            return dst

        cur = inp
        if params.pre_cast is not None:
            cur = step("Cast", {"to": int(params.pre_cast)}, cur, None, params.pre_cast)
        if params.perm is not None:
            cur = step("Transpose", {"perm": list(params.perm)}, cur, None, params.dtype)
        back = params.perm is not None and keep_back
        needs_tail = back or params.out_cast is not None
        norm_out = ir.Variable(name("lnfuse_normalized"), dtype=np_dtype(params.dtype)) if needs_tail else out
        if scale_t is None:
            scale_t = ir.Constant(name("lnfuse_scale"), params.scale)
        ins = [cur, scale_t]
        if params.bias is not None and params.op == "LayerNormalization":
            ins.append(bias_t if bias_t is not None else ir.Constant(name("lnfuse_bias"), params.bias))
        attrs: dict[str, object] = {"axis": int(params.axis), "epsilon": float(params.epsilon)}
        if params.op == "LayerNormalization" or params.stash_type != 1:
            attrs["stash_type"] = int(params.stash_type)
        outs: list[ir.Tensor] = [norm_out]
        extra: dict[str, ir.Tensor] = {}
        if side and params.side_flatten_axis is not None:
            stash = np.float64 if params.stash_type == 11 else np.float32
            extra = {
                kind: t if kind in params.side_direct else ir.Variable(name(f"lnfuse_{kind}"), dtype=stash)
                for kind, t in side
            }
            outs += [extra.get("mean", ir.Variable.empty()), extra.get("inv_std", ir.Variable.empty())]
            while outs and outs[-1].is_empty():
                outs.pop()
        nodes.append(ir.Node(params.op, name(f"lnfuse/{params.op}"), attrs, ins, outs))
        stash_type = TP.DOUBLE if params.stash_type == 11 else TP.FLOAT
        for kind, t in side or []:
            if kind in extra and kind not in params.side_direct:
                step("Flatten", {"axis": params.side_flatten_axis}, extra[kind], t, stash_type)
        cur = norm_out
        if back:
            assert params.perm is not None
            inv = [0] * len(params.perm)
            for i, p in enumerate(params.perm):
                inv[p] = i
            cur = step(
                "Transpose", {"perm": inv}, cur, out if params.out_cast is None else None, params.dtype
            )
        if params.out_cast is not None:
            step("Cast", {"to": int(params.out_cast)}, cur, out, params.out_cast)
        return nodes

    def input_of(self, mg: ModelGraph, cand: Candidate, params: NormParams) -> ir.Tensor:
        return cand.source if cand.source is not None else cand.x

    def rewrite(self, mg: ModelGraph, cand: Candidate, params: NormParams) -> None:
        inp = self.input_of(mg, cand, params)
        out = cand.final if cand.final is not None else cand.output
        replaced = [*cand.nodes, *(n for n in cand.suffix if n.op != "Shape"), *cand.side_nodes]
        # The new nodes read only the source (defined before the match) and initializers, and
        # must come before every reader of the outputs: the first replaced node's place suits.
        position = cand.view.position
        anchor = min(replaced, key=lambda n: position.get(id(n), 1 << 60))
        scale_t = _find_const(cand, params.scale_source)
        bias_t = _find_const(cand, params.bias_source)
        side = list(cand.side_outputs) if params.side_flatten_axis is not None else None
        if side and params.side_direct:
            inside = {id(n) for n in replaced}
            direct = {
                kind: next(c for c in t.outputs if id(c) not in inside and c.op == "Reshape")
                for kind, t in side
                if kind in params.side_direct
            }
            replaced += list(direct.values())
            side = [(kind, direct[kind].outputs[0] if kind in direct else t) for kind, t in side]
        undo = undoing_transpose(mg, out, params)
        if undo is not None:  # LN over channels then the exporter's own Transpose to channels-last
            replaced.append(undo)
            out = undo.outputs[0]
        mg.detach(replaced)
        new_nodes = self.build(params, inp, out, mg.unique_name, scale_t, bias_t, side, undo is None)
        mg.replace(cand.view, replaced, anchor, new_nodes)


def undoing_transpose(mg: ModelGraph, out: ir.Tensor, params: NormParams) -> ir.Node | None:
    """The one reader of ``out``, when it is a Transpose by the fused op's own ``perm``: it undoes the
    Transpose back, so the norm's result in the transposed layout is what it computes."""
    if params.perm is None or params.out_cast is not None or mg.is_graph_output(out) or len(out.outputs) != 1:
        return None
    t = out.outputs[0]
    perm = t.attrs.get("perm")
    if t.op != "Transpose" or t.domain or perm is None or tuple(int(p) for p in perm) != params.perm:
        return None
    return t


def _sandwich(
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


def _direct_side_reshapes(mg: ModelGraph, cand: Candidate, axis: int) -> tuple[str, ...]:
    """Side outputs whose one reader is ``Reshape(t, shape)`` with ``shape`` equal (for any value of
    the dynamic dims) to LayerNormalization's Mean / InvStdDev shape for the source: ``x0.shape`` with
    the normalized axes set to 1. ONNX's function body computes that shape from Shape / Size / Slice /
    Sub / ConstantOfShape / Concat."""
    source = cand.source if cand.source is not None else cand.x
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


def _is_centred(mg: ModelGraph, t: ir.Tensor) -> bool:
    """``t`` is ``a - Reduce*(...)``: a centred value."""
    p = _through(mg, t)
    if p is None or p.op != "Sub" or len(p.inputs) != 2:
        return False
    q = _through(mg, p.inputs[1])
    return q is not None and q.op in ("ReduceMean", "ReduceSum", "GlobalAveragePool")


def _reusable(mg: ModelGraph, cand: Candidate, arr: np.ndarray | None) -> str | None:
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


def _find_const(cand: Candidate, name: str | None) -> ir.Tensor | None:
    if name is None:
        return None
    for c in cand.const_inputs:
        if c.name == name:
            return c
    return None
