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

from lnfuse import checks as C
from lnfuse import ir
from lnfuse.graph import ModelGraph, node_label, np_dtype
from lnfuse.matcher import SPENT, Candidate, Refusal, Walker
from lnfuse.symbolic import Flag, NormKind

TP = onnx.TensorProto
# The op each kind is fused into and the default-domain opset that op exists from.
FUSED_OPS: dict[NormKind, tuple[str, int]] = {
    NormKind.LN: ("LayerNormalization", 17),
    NormKind.RMS: ("RMSNormalization", 23),
}
MIN_OPSET: dict[str, int] = dict(FUSED_OPS.values())


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
    extent: C.Extent  # what the fused op reads and writes, and the nodes around the match it replaces
    pre_cast: int | None = None  # Cast the source to this type before the norm
    side_flatten_axis: int | None = None  # Mean/InvStdDev outputs reused, flattened back at this axis
    # Kinds ("mean", "inv_std") whose only reader is a Reshape to the op's own Mean/InvStdDev shape:
    # that Reshape's output comes straight from the fused op (no Flatten, no Reshape).
    side_direct: tuple[str, ...] = ()
    scale_source: str | None = None  # name of an original initializer reused as Scale
    bias_source: str | None = None


class NormRule:
    """Fuses one kind of normalization."""

    def __init__(self, kind: NormKind) -> None:
        self.kind = NormKind(kind)
        self.op, self.min_opset = FUSED_OPS[self.kind]

    # -- pattern ------------------------------------------------------------------
    def pattern(self, mg: ModelGraph) -> Iterator[Candidate | Refusal | AnchorNote]:
        walker = Walker(mg)
        # node -> group of the candidate that took it (nodes, not their ids, as keys: no int each)
        claimed: dict[ir.Node, int | None] = {}
        said: list[tuple[object, Refusal | AnchorNote]] = []
        for x, axes, rank, anchor, positive, views in walker.proposals(self.kind):
            res = walker.walk(x, axes, rank, anchor, positive, views)
            for cand in res.candidates:
                if cand.form.kind != self.kind:
                    continue
                if any(n in claimed and claimed[n] != cand.group for n in cand.nodes) or (
                    cand.group is None and any(n in claimed for n in cand.nodes)
                ):
                    continue
                claimed.update((n, cand.group) for n in cand.nodes)
                yield cand
            if self.kind is NormKind.LN:
                said.extend((anchor, r) for r in res.refusals)
            if res.note:
                said.append((anchor, AnchorNote(node_label(anchor), res.note)))
        # An anchor is walked as itself and, when it reads a reshaped view, as that view: what a
        # walk that found nothing says only counts when no walk of that anchor found a norm.
        yield from (item for anchor, item in said if anchor not in claimed)

    # -- check ---------------------------------------------------------------------
    def check(self, mg: ModelGraph, cand: Candidate, *, allow_transpose: bool = True) -> NormParams | Refusal:
        """The plan for fusing ``cand`` (:mod:`lnfuse.checks`, step by step), or why not.
        Neither the graph nor the candidate is changed."""
        typed = C.types(mg, self.kind, cand)
        if isinstance(typed, str):
            return _refuse(cand, typed)
        xdt, tdt = typed
        dims = C.normalized_shape(mg, cand)
        if isinstance(dims, str):
            return _refuse(cand, dims)
        norm_shape, rank = dims
        flags = set(cand.flags)
        variance = C.variance_flags(self.kind, cand, math.prod(norm_shape), xdt)
        if isinstance(variance, str):
            return _refuse(cand, variance)
        flags |= variance
        eps = cand.form.edef.eps
        if not np.isfinite(eps) or eps < 0:
            return _refuse(cand, f"epsilon {eps} is negative or not finite")
        lay = C.layout(cand, norm_shape, rank, allow_transpose)
        if isinstance(lay, str):
            return _refuse(cand, lay)
        if lay.perm is not None:
            flags.add(Flag.TRANSPOSED)
        found = C.extent(mg, cand, xdt, tdt, lay)
        if isinstance(found, str):
            return _refuse(cand, found)
        ext, lay, unflattened = found
        if unflattened:
            flags.add(Flag.UNFLATTENED)
        dtype, pre_cast, ext = C.compute_type(mg, cand, ext, xdt, lay)
        coefs = C.coefficients(lay, dtype)
        if isinstance(coefs, str):
            return _refuse(cand, coefs)
        scale, bias = coefs
        double = dtype == TP.DOUBLE and xdt == TP.DOUBLE
        side = C.side_outputs(mg, cand, ext, unflattened, TP.DOUBLE if double else TP.FLOAT, lay.axis)
        if isinstance(side, str):
            return _refuse(cand, side)
        if cand.side_outputs:
            flags.add(Flag.MEAN_INVSTD_REUSED)
        if double:
            # stash_type may only be float or bfloat16: a stash_type=11 node is not standard ONNX
            # (onnx.reference refuses it), and float32 statistics would not reproduce fp64 ones.
            return _refuse(
                cand,
                "float64 statistics: the standard op computes them in float32 or bfloat16 only "
                "(stash_type=11 is not ONNX), so a float64 norm is left as it is",
            )
        if Flag.FP16_SQUARE in flags:
            flags.add(Flag.FP16_OVERFLOW_PRONE)
        tdt_final = mg.dtype(ext.final)
        return NormParams(
            op=self.op,
            epsilon=float(np.float32(eps)),
            axis=lay.axis,
            stash_type=1,  # float32 statistics (float64 ones are refused above)
            normalized_shape=lay.normalized_shape,
            scale=scale,
            bias=bias,
            dtype=dtype,
            read_source=ext.source is not cand.x,
            out_cast=None if tdt_final == dtype else tdt_final,
            perm=lay.perm,
            pattern=C.pattern_label(cand, mg, flags),
            flags=frozenset(flags),
            extent=ext,
            pre_cast=pre_cast,
            side_flatten_axis=side[0],
            side_direct=side[1],
            scale_source=C.reusable(mg, cand, scale),
            bias_source=C.reusable(mg, cand, bias) if bias is not None else None,
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

    def settled(self, cand: Candidate, params: NormParams) -> tuple[Candidate, NormParams]:
        """``cand`` and ``params`` with only what :meth:`rewrite` reads, once checked and proven
        (accepted candidates wait for the rewrite phase together): see ``Candidate.settled``; a
        scale or bias an original initializer supplies no longer needs its values here."""
        drop = {
            field: SPENT
            for field, source in (("scale", params.scale_source), ("bias", params.bias_source))
            if _find_const(cand, source) is not None
        }
        if drop:
            spent = NormParams.__new__(NormParams)  # frozen: a field-for-field copy
            spent.__dict__.update(params.__dict__, **drop)
            params = spent
        return cand.settled(), params

    def input_of(self, mg: ModelGraph, cand: Candidate, params: NormParams) -> ir.Tensor:
        return params.extent.source

    def rewrite(self, mg: ModelGraph, cand: Candidate, params: NormParams) -> None:
        inp = self.input_of(mg, cand, params)
        out = params.extent.final
        replaced = [*cand.nodes, *(n for n in params.extent.suffix if n.op != "Shape"), *cand.side_nodes]
        # The new nodes read only the source (defined before the match) and initializers, and
        # must come before every reader of the outputs: the first replaced node's place suits.
        anchor = min(replaced, key=lambda n: n.pos if n.scope is cand.view else ir.UNPLACED)
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


def _refuse(cand: Candidate, reason: str) -> Refusal:
    return Refusal(
        reason=reason,
        nodes=[node_label(n) for n in cand.nodes],
        anchor=node_label(cand.nodes[-1]),
        graph=cand.view.path,
    )


def _find_const(cand: Candidate, name: str | None) -> ir.Tensor | None:
    if name is None:
        return None
    for c in cand.const_inputs:
        if c.name == name:
            return c
    return None
