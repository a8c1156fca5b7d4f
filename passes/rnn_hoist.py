"""Hoist the input-side LayerNorm of an unrolled LN-RNN out of the time loop.

In an LN-RNN (Ba et al. 2016) every step ``t`` computes the input-side term

    u_t = LN(x_t @ W [+ b]),   x_t = X[t]  (slice of one sequence along the time axis)

which does not depend on the recurrence. When all ``T`` steps apply the *same*
weight ``W`` (an initializer, or an ``Identity`` alias of it), the same optional
bias ``b`` and the same ``LayerNormalization`` (same Scale / B tensors, epsilon,
stash_type, axis = last) to distinct, contiguous slices of the *same* ``X``, the
``T`` MatMuls and ``T`` LayerNorms are rewritten into

    Y = X' @ W [+ b]                      X' = X, or X[lo:hi+1] along the time axis
    Z = LayerNormalization(Y, Scale, B, axis=-1, epsilon, stash_type)
    u_t = Gather(Z, t - lo, axis=time)    (a scalar index where x_t dropped the time
                                           axis, a [1] index where it kept it)

The statistics stay per time step and per example (``axis=-1`` normalizes each
row of ``H`` features on its own), so the result is the same function. Recognised
step slices of ``X`` along a non-feature axis ``a``: ``Gather(X, const i, axis=a)``
(scalar or one-element index), ``Slice(X, [t], [t+1], [a])`` and ``Split(X, axis=a)``
into size-1 pieces, each optionally followed by ``Squeeze(axes=[a])``. The step
MatMul is ``MatMul(x_t, W)`` with ``W`` a rank-2 constant, or ``Gemm(x_t, W, C)``
with ``alpha = beta = 1``, ``transA = 0`` (``transB`` folded into a transposed copy
of ``W``); between it and the LN an ``Add`` of a constant per-feature bias may stand.

Candidates are indexed by weight (one dict lookup per MatMul/Gemm, linear in graph
size). A weight's group is rewritten only when every slice-fed use of it qualifies:
same ``X`` and time axis, distinct indices forming a contiguous range, at least two
steps, per-step MatMul / Add outputs with no other consumer and not graph outputs,
the LN's optional Mean / InvStdDev outputs unused, identical LN parameters. With a
static time dimension indices are normalized (negative ones too); with a symbolic
one only ``Gather`` steps with non-negative indices qualify, and ``X`` is sliced to
``[lo, hi+1)`` first, so an index out of range still fails exactly where the original
failed. Anything else leaves the whole group per step. Runs after the LayerNorm
pass (it sees fused ``LayerNormalization`` nodes); ``hoist=False`` / ``--no-hoist``
switches it off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from lnfuse import ir
from lnfuse import opset as opset_mod
from lnfuse.graph import Dim, GraphView, ModelGraph
from lnfuse.pipeline import PassContext, PassResult

_DEFAULT_DOMAINS = (None, "", "ai.onnx")
_MIN_OPSET = 11  # emitted Gather / Slice (input form) must keep their meaning when the opset is raised


@dataclass
class _Slice:
    """How one step tensor was cut out of the sequence (before normalization)."""

    source: ir.Tensor
    kind: str  # gather | slice | split
    axis: int  # raw axis attribute
    start: int  # gather index / slice start / split output position
    end: int | None = None  # slice end
    step: int = 1  # slice step
    keepdim: bool = False  # the time axis survives (size 1) in the step tensor
    squeeze_axis: int | None = None
    split_sizes: list[int] | None = None  # None: equal split into n_outputs pieces
    n_outputs: int = 0
    nodes: list[ir.Node] = field(default_factory=list)  # nearest first


@dataclass
class _Member:
    """One step: slice -> MatMul/Gemm [-> Add const] -> LayerNormalization."""

    mm: ir.Node
    cut: _Slice
    adds: list[ir.Node] = field(default_factory=list)
    add_consts: list[ir.Tensor] = field(default_factory=list)  # Gemm C first, then the Add bias
    ln: ir.Node | None = None
    index: int = 0  # normalized time index
    aliases: list[ir.Node] = field(default_factory=list)  # Identity chain W -> MatMul, nearest first


@dataclass
class _Plan:
    view: GraphView
    members: list[_Member]
    source: ir.Tensor
    axis: int
    lo: int
    hi: int
    prefix_slice: bool
    weight: ir.Tensor
    trans_b: bool
    is_gemm: bool


class RnnHoistPass:
    name = "rnn-hoist"
    description = "unrolled LN-RNN: T x LN(x_t @ W) -> one LN(X @ W) over [T, B, H], sliced per step"
    emits = None  # only regroups LayerNormalization ops the model already has

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.hoist

    def __call__(self, mg: ModelGraph, ctx: PassContext) -> PassResult:
        opset = opset_mod.default_opset(mg.model)
        if opset is None or opset < _MIN_OPSET:
            return PassResult(mg, False)
        digests: dict[int, str] = {}
        modified = False
        for view in list(mg.views):
            if not view.nodes_by_op.get("LayerNormalization"):
                continue
            groups: dict[tuple, list[_Member]] = {}
            for op in ("MatMul", "Gemm"):
                for node in view.nodes_by_op.get(op, ()):
                    key = _weight_key(mg, node)
                    if key is None:
                        continue
                    cut = _step_slice(mg, node.inputs[0])
                    if cut is None:
                        continue
                    groups.setdefault(key, []).append(_Member(mm=node, cut=cut))
            for members in groups.values():
                plan = _plan(mg, view, members, digests)
                if isinstance(plan, str):
                    if len(members) > 1:  # a single sliced MatMul is not a recurrence: say nothing
                        w = members[0].mm.inputs[1].name
                        where = "" if view.path == "main" else f" in {view.path}"
                        ctx.report.hoist_refusals.append(
                            f"input-side LN of W '{w}' over {len(members)} steps{where} not hoisted: {plan}"
                        )
                    continue
                ctx.report.hoisted.append(_rewrite(mg, plan))
                modified = True
        if modified:
            mg.commit()
        return PassResult(mg, modified)


# ----------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------


def _default(node: ir.Node) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _weight_key(mg: ModelGraph, node: ir.Node) -> tuple | None:
    """Group key of a MatMul/Gemm with a constant rank-2 weight: (op, transB, weight source)."""
    if not _default(node) or len(node.outputs) != 1 or len(node.inputs) < 2:
        return None
    trans_b = False
    if node.op == "Gemm":
        a = node.attrs
        if int(a.get("transA", 0)) != 0 or float(a.get("alpha", 1.0)) != 1.0:
            return None
        if len(node.inputs) > 2 and node.inputs[2].name and float(a.get("beta", 1.0)) != 1.0:
            return None
        trans_b = bool(int(a.get("transB", 0)))
    w_shape = mg.const_shape(node.inputs[1])  # big weights: no need to load them
    if w_shape is None or len(w_shape) != 2:
        return None
    src = mg.constant_source(node.inputs[1])
    return (node.op, trans_b, id(src))


def _ints(mg: ModelGraph, node: ir.Node, attr: str, pos: int) -> list[int] | None:
    """An int list given as attribute ``attr`` (old opsets) or constant input ``pos``; None if absent/unknown."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > pos and node.inputs[pos].name:
        v = mg.const_value(node.inputs[pos])
        if v is None or v.dtype.kind not in "iu":
            return None
        return [int(x) for x in v.reshape(-1)]
    return None


def _step_slice(mg: ModelGraph, t: ir.Tensor) -> _Slice | None:
    """Recognise ``t`` as one time step cut out of a sequence, or None."""
    p = mg.producer(t)
    if p is None or not _default(p):
        return None
    if p.op == "Gather":
        return _gather_step(mg, p)
    nodes: list[ir.Node] = []
    squeeze_axis: int | None = None
    u = t
    if p.op == "Squeeze":
        squeeze_axis = _squeeze_axis(mg, p)
        if squeeze_axis is None:
            return None
        nodes.append(p)
        u = p.inputs[0]
        p = mg.producer(u)
        if p is None or not _default(p):
            return None
    if p.op == "Slice":
        return _slice_step(mg, p, squeeze_axis, nodes)
    if p.op == "Split":
        return _split_step(mg, p, u, squeeze_axis, nodes)
    if p.op == "Gather":
        # Gather(X, [i]) keeps the time axis (size 1) for the Squeeze to drop; a scalar index has
        # dropped it already, and the Squeeze would take another axis.
        cut = _gather_step(mg, p)
        if cut is None or not cut.keepdim:
            return None
        return replace(cut, keepdim=False, squeeze_axis=squeeze_axis, nodes=[*nodes, p])
    return None


def _gather_step(mg: ModelGraph, p: ir.Node) -> _Slice | None:
    """The step cut by ``Gather(X, const i)`` (scalar or one-element index), or None."""
    if len(p.inputs) != 2 or len(p.outputs) != 1:
        return None
    idx = mg.const_value(p.inputs[1])
    if idx is None or idx.dtype.kind not in "iu" or idx.size != 1 or idx.ndim > 1:
        return None
    return _Slice(
        source=p.inputs[0],
        kind="gather",
        axis=int(p.attrs.get("axis", 0)),
        start=int(idx.reshape(-1)[0]),
        keepdim=idx.ndim == 1,
        nodes=[p],
    )


def _squeeze_axis(mg: ModelGraph, p: ir.Node) -> int | None:
    """The single axis a ``Squeeze`` removes, or None if it is not exactly one known axis."""
    if not p.inputs:
        return None
    axes = _ints(mg, p, "axes", 1)
    if axes is None or len(axes) != 1:
        return None
    return axes[0]


def _slice_args(mg: ModelGraph, p: ir.Node) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of a one-axis ``Slice`` (attribute or input form), or None."""
    if "starts" in p.attrs:  # opset < 10
        starts, ends = _ints(mg, p, "starts", 99), _ints(mg, p, "ends", 99)
        axes = _ints(mg, p, "axes", 99)
        steps: list[int] | None = [1]
    else:
        starts, ends = _ints(mg, p, "_", 1), _ints(mg, p, "_", 2)
        axes = _ints(mg, p, "_", 3) if len(p.inputs) > 3 and p.inputs[3].name else None
        steps = _ints(mg, p, "_", 4) if len(p.inputs) > 4 and p.inputs[4].name else [1]
        if len(p.inputs) > 3 and p.inputs[3].name and axes is None:
            return None
    if starts is None or ends is None or steps is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes is None:
        axes = [0]
    if len(axes) != 1 or len(steps) != 1:
        return None
    return starts[0], ends[0], axes[0], steps[0]


def _slice_step(mg: ModelGraph, p: ir.Node, squeeze_axis: int | None, nodes: list[ir.Node]) -> _Slice | None:
    """The step cut by a one-axis ``Slice`` [-> ``Squeeze``], or None."""
    if not p.inputs or len(p.outputs) != 1:
        return None
    args = _slice_args(mg, p)
    if args is None:
        return None
    start, end, axis, step = args
    return _Slice(
        source=p.inputs[0],
        kind="slice",
        axis=axis,
        start=start,
        end=end,
        step=step,
        keepdim=squeeze_axis is None,
        squeeze_axis=squeeze_axis,
        nodes=[*nodes, p],
    )


def _split_step(
    mg: ModelGraph, p: ir.Node, u: ir.Tensor, squeeze_axis: int | None, nodes: list[ir.Node]
) -> _Slice | None:
    """The step cut as output ``u`` of a ``Split`` [-> ``Squeeze``], or None."""
    if not p.inputs:
        return None
    k = next((i for i, o in enumerate(p.outputs) if o is u), None)
    if k is None:
        return None
    sizes = None
    if "split" in p.attrs or (len(p.inputs) > 1 and p.inputs[1].name):
        sizes = _ints(mg, p, "split", 1)
        if sizes is None:
            return None
    return _Slice(
        source=p.inputs[0],
        kind="split",
        axis=int(p.attrs.get("axis", 0)),
        start=k,
        keepdim=squeeze_axis is None,
        squeeze_axis=squeeze_axis,
        split_sizes=sizes,
        n_outputs=len(p.outputs),
        nodes=[*nodes, p],
    )


def _time_index(cut: _Slice, rank: int, steps: Dim) -> tuple[int, int] | None:
    """(normalized time axis, index) of one step, or None if it is not a single in-range step."""
    axis = cut.axis + rank if cut.axis < 0 else cut.axis
    if not 0 <= axis <= rank - 2:  # the time axis must not be the feature axis MatMul contracts
        return None
    if cut.squeeze_axis is not None:
        sq = cut.squeeze_axis + rank if cut.squeeze_axis < 0 else cut.squeeze_axis
        if sq != axis:
            return None
    static = isinstance(steps, int)
    if cut.kind == "gather":
        i = cut.start
        if static:
            i = i + steps if i < 0 else i  # type: ignore[operator]
            if not 0 <= i < steps:  # type: ignore[operator]
                return None
        elif i < 0:
            return None
        return axis, i
    if not static:  # Slice clamps and Split checks sizes at run time: only exact with static T
        return None
    n = int(steps)  # type: ignore[arg-type]
    if cut.kind == "slice":
        if cut.step != 1 or cut.end is None:
            return None
        s = cut.start + n if cut.start < 0 else cut.start
        e = cut.end + n if cut.end < 0 else cut.end
        s, e = min(max(s, 0), n), min(max(e, 0), n)
        if e - s != 1:
            return None
        return axis, s
    # split
    if cut.split_sizes is not None:
        if any(v != 1 for v in cut.split_sizes) or len(cut.split_sizes) != n or cut.n_outputs != n:
            return None
    elif cut.n_outputs != n:
        return None
    return axis, cut.start


def _digest(mg: ModelGraph, t: ir.Tensor, cache: dict[int, str]) -> tuple | None:
    """Equality key of an LN parameter: constants by value, other tensors by identity."""
    if t is None or not t.name:
        return ("none",)
    src = mg.constant_source(t)
    if id(src) in cache:
        return ("c", cache[id(src)])
    v = mg.const_value(t)
    if v is None:
        return ("t", id(t))
    arr = np.ascontiguousarray(v)
    h = hashlib.blake2b(arr.tobytes(), digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    cache[id(src)] = h.hexdigest()
    return ("c", cache[id(src)])


def _per_feature(v: np.ndarray, hidden: int, out_rank: int) -> bool:
    """A bias that adds the same value per feature whatever the leading axes: scalar, [H], [1, .., H]."""
    if v.ndim > out_rank:
        return False
    if v.size == 1:
        return True
    return v.ndim >= 1 and v.shape[-1] == hidden and v.size == hidden


def _identity_chain(mg: ModelGraph, t: ir.Tensor) -> list[ir.Node]:
    chain: list[ir.Node] = []
    p = mg.producer(t)
    while p is not None and p.op == "Identity" and _default(p) and p.inputs and len(chain) < 8:
        chain.append(p)
        p = mg.producer(p.inputs[0])
    return chain


def _single_use(mg: ModelGraph, t: ir.Tensor) -> ir.Node | None:
    outs = t.outputs
    if len(outs) != 1 or mg.is_graph_output(t):
        return None
    return outs[0]


def _step_chain(
    mg: ModelGraph, view: GraphView, mm: ir.Node, is_gemm: bool
) -> tuple[list[ir.Node], list[ir.Tensor], ir.Node] | str:
    """(Adds, bias constants, LayerNormalization) that follow one step's MatMul/Gemm, or why not."""
    consts: list[ir.Tensor] = []
    if is_gemm and len(mm.inputs) > 2 and mm.inputs[2].name:
        consts.append(mm.inputs[2])
    t = mm.outputs[0]
    nxt = _single_use(mg, t)
    adds: list[ir.Node] = []
    if nxt is not None and nxt.op == "Add" and _default(nxt) and len(nxt.inputs) == 2:
        other = nxt.inputs[1] if nxt.inputs[0] is t else nxt.inputs[0]
        if mg.const_value(other) is not None and mg.view_of(nxt) is view:
            adds.append(nxt)
            consts.append(other)
            t = nxt.outputs[0]
            nxt = _single_use(mg, t)
    if nxt is None or nxt.op != "LayerNormalization" or not _default(nxt) or nxt.inputs[0] is not t:
        return "a step's MatMul output is not used by exactly one LayerNormalization"
    if mg.view_of(nxt) is not view:
        return "a step's LayerNormalization is in another graph"
    return adds, consts, nxt


def _ln_refusal(
    mg: ModelGraph, ln: ir.Node, consts: list[ir.Tensor], hidden: int, out_rank: int
) -> str | None:
    """Why one step's LayerNormalization and biases cannot be hoisted, or None if they can."""
    for extra in ln.outputs[1:]:
        if extra.outputs or mg.is_graph_output(extra):
            return "a LayerNormalization's Mean / InvStdDev output is used"
    for c in consts:
        cv = mg.const_value(c)
        if cv is None or not _per_feature(cv, hidden, out_rank):
            return "bias is not a per-feature constant"
    ln_axis = int(ln.attrs.get("axis", -1))
    if ln_axis not in (-1, out_rank - 1):
        return "LayerNormalization not over the last axis"
    return None


def _ln_key(
    mg: ModelGraph, ln: ir.Node, adds: list[ir.Node], consts: list[ir.Tensor], digests: dict[int, str]
) -> tuple:
    """Equality key of one step's LN attributes, LN parameters and biases."""
    scale = ln.inputs[1] if len(ln.inputs) > 1 else None
    bias = ln.inputs[2] if len(ln.inputs) > 2 else None
    return (
        float(ln.attrs.get("epsilon", 1e-5)),
        int(ln.attrs.get("stash_type", 1)),
        _digest(mg, scale, digests),
        _digest(mg, bias, digests),
        len(consts),
        len(adds),
        tuple(_digest(mg, c, digests) for c in consts),
    )


def _step_range(members: list[_Member]) -> tuple[int, int] | None:
    """(lo, hi) of the members' time indices, or None if they repeat or leave a gap."""
    indices = sorted(m.index for m in members)
    lo, hi = indices[0], indices[-1]
    if indices != list(range(lo, hi + 1)):
        return None
    return lo, hi


def _plan(mg: ModelGraph, view: GraphView, members: list[_Member], digests: dict[int, str]) -> _Plan | str:
    """Check one weight's group; a plan, or why it stays per step."""
    if len(members) < 2:
        return "fewer than 2 steps"
    source = members[0].cut.source
    if any(m.cut.source is not source for m in members):
        return "steps slice different sequences"
    shape = mg.shape(source)
    if shape is None or len(shape) < 2:
        return "rank of the sequence unknown"
    rank = len(shape)
    mm0 = members[0].mm
    is_gemm = mm0.op == "Gemm"
    trans_b = is_gemm and bool(int(mm0.attrs.get("transB", 0)))
    w_shape = mg.const_shape(mm0.inputs[1])
    assert w_shape is not None
    hidden = int(w_shape[0] if trans_b else w_shape[1])
    axis: int | None = None
    ln_key: tuple | None = None
    planned: list[_Member] = []  # the members with their time index and chain (inputs unchanged)
    for m in members:
        ax = m.cut.axis + rank if m.cut.axis < 0 else m.cut.axis
        ti = _time_index(m.cut, rank, shape[ax] if 0 <= ax < rank else None)
        if ti is None:
            return "a step is not a single in-range slice along a non-feature axis"
        if axis is None:
            axis = ti[0]
        elif ti[0] != axis:
            return "steps slice along different axes"
        step_rank = rank if m.cut.keepdim else rank - 1
        if is_gemm and step_rank != 2:
            return "Gemm on a step that is not 2-D"
        chain = _step_chain(mg, view, m.mm, is_gemm)
        if isinstance(chain, str):
            return chain
        adds, consts, ln = chain
        why = _ln_refusal(mg, ln, consts, hidden, step_rank)
        if why is not None:
            return why
        key = _ln_key(mg, ln, adds, consts, digests)
        if ln_key is None:
            ln_key = key
        elif key != ln_key:
            return "LayerNormalization parameters or biases differ between steps"
        aliases = _identity_chain(mg, m.mm.inputs[1])
        planned.append(replace(m, index=ti[1], adds=adds, add_consts=consts, ln=ln, aliases=aliases))
    assert axis is not None
    span = _step_range(planned)
    if span is None:
        return "step indices are repeated or not contiguous"
    lo, hi = span
    steps = shape[axis]
    full = isinstance(steps, int) and lo == 0 and hi == steps - 1
    return _Plan(
        view=view,
        members=planned,
        source=source,
        axis=axis,
        lo=lo,
        hi=hi,
        prefix_slice=not full,
        weight=mg.constant_source(mm0.inputs[1]),
        trans_b=trans_b,
        is_gemm=is_gemm,
    )


# ----------------------------------------------------------------------------
# Rewriting
# ----------------------------------------------------------------------------


def _i64(mg: ModelGraph, base: str, values: list[int] | int) -> ir.Constant:
    return ir.Constant(mg.unique_name(base), np.array(values, dtype=np.int64))


def _dead(mg: ModelGraph, node: ir.Node) -> bool:
    mg.flush()
    return all(not t.outputs and not mg.is_graph_output(t) for t in node.outputs)


def _rewrite(mg: ModelGraph, plan: _Plan) -> str:
    """Replace the group's per-step MatMul [+ Add] + LN by one hoisted chain; the report line."""
    view, members = plan.view, plan.members
    anchor_m = min(members, key=lambda m: m.ln.pos)
    anchor = anchor_m.ln
    assert anchor is not None
    base = plan.source.name or "seq"
    seq, new = _time_window(mg, plan, base)
    z, hoisted = _hoisted_ln(mg, plan, anchor_m, seq, base)
    new += hoisted

    removed: list[ir.Node] = []
    for m in members:
        assert m.ln is not None
        removed += [m.mm, *m.adds, m.ln]
    outs = {id(m.ln): m.ln.outputs[0] for m in members}  # type: ignore[union-attr]
    mg.detach(removed)
    new += _step_gathers(mg, plan, z, outs, base)
    mg.replace(view, removed, anchor, new)
    _drop_dead_feeders(mg, members)
    return _summary(plan, anchor_m)


def _time_window(mg: ModelGraph, plan: _Plan, base: str) -> tuple[ir.Tensor, list[ir.Node]]:
    """(sequence the hoisted MatMul reads, nodes that cut it): X itself, or X[lo:hi+1] along time."""
    seq = plan.source
    if not plan.prefix_slice:
        return seq, []
    sliced = ir.Variable(mg.unique_name(f"{base}_hoist_steps"), dtype=seq.dtype)
    node = ir.Node(
        "Slice",
        name=mg.unique_name("lnfuse/hoist/Slice"),
        inputs=[
            seq,
            _i64(mg, f"{base}_hoist_start", [plan.lo]),
            _i64(mg, f"{base}_hoist_end", [plan.hi + 1]),
            _i64(mg, f"{base}_hoist_axis", [plan.axis]),
        ],
        outputs=[sliced],
    )
    return sliced, [node]


def _hoisted_ln(
    mg: ModelGraph, plan: _Plan, anchor_m: _Member, seq: ir.Tensor, base: str
) -> tuple[ir.Tensor, list[ir.Node]]:
    """(Z, nodes computing Z = LN(seq @ W [+ b]) with the anchor step's LN parameters)."""
    anchor = anchor_m.ln
    assert anchor is not None
    dtype = anchor.outputs[0].dtype
    new: list[ir.Node] = []
    weight: ir.Tensor = plan.weight
    if plan.trans_b:
        wv = mg.const_value(plan.weight)
        assert wv is not None
        weight = ir.Constant(mg.unique_name(f"{plan.weight.name}_T"), np.ascontiguousarray(wv.T))
    cur = ir.Variable(mg.unique_name(f"{base}_hoist_matmul"), dtype=dtype)
    new.append(
        ir.Node("MatMul", name=mg.unique_name("lnfuse/hoist/MatMul"), inputs=[seq, weight], outputs=[cur])
    )
    for c in anchor_m.add_consts:
        nxt = ir.Variable(mg.unique_name(f"{base}_hoist_add"), dtype=dtype)
        new.append(ir.Node("Add", name=mg.unique_name("lnfuse/hoist/Add"), inputs=[cur, c], outputs=[nxt]))
        cur = nxt
    z = ir.Variable(mg.unique_name(f"{base}_hoist_ln"), dtype=dtype)
    attrs = {
        "axis": -1,
        "epsilon": float(anchor.attrs.get("epsilon", 1e-5)),
        "stash_type": int(anchor.attrs.get("stash_type", 1)),
    }
    ln_inputs = [cur, *(t for t in anchor.inputs[1:] if t is not None)]
    new.append(
        ir.Node(
            "LayerNormalization",
            name=mg.unique_name("lnfuse/hoist/LayerNormalization"),
            attrs=attrs,
            inputs=ln_inputs,
            outputs=[z],
        )
    )
    return z, new


def _step_gathers(
    mg: ModelGraph, plan: _Plan, z: ir.Tensor, outs: dict[int, ir.Tensor], base: str
) -> list[ir.Node]:
    """One ``Gather(Z, t - lo)`` per step, in time order, writing that step's old LN output."""
    new: list[ir.Node] = []
    for m in sorted(plan.members, key=lambda m: m.index):
        idx = m.index - plan.lo
        index_t = _i64(mg, f"{base}_hoist_t{idx}", [idx] if m.cut.keepdim else idx)
        new.append(
            ir.Node(
                "Gather",
                name=mg.unique_name("lnfuse/hoist/Gather"),
                attrs={"axis": plan.axis},
                inputs=[z, index_t],
                outputs=[outs[id(m.ln)]],
            )
        )
    return new


def _drop_dead_feeders(mg: ModelGraph, members: list[_Member]) -> None:
    """Remove step slices and weight aliases left without consumers (nearest first)."""
    # Each goes from its own graph (an outer-scope slice or alias lives in an enclosing graph).
    for m in members:
        for chain in (m.cut.nodes, m.aliases):
            for node in chain:
                if not _dead(mg, node):
                    break
                mg.detach([node])
                home = mg.view_of(node)
                if home is not None:
                    mg.replace(home, [node], node, [])


def _summary(plan: _Plan, anchor_m: _Member) -> str:
    """The report line of one hoisted group: which ops it replaced by how many."""
    n = len(plan.members)
    op = "Gemm" if plan.is_gemm else "MatMul"
    parts = [f"{n} {op}"] + [f"{n} Add"] * len(anchor_m.adds) + [f"{n} LayerNormalization"]
    after = " + ".join(["1"] * len(parts))
    where = "" if plan.view.path == "main" else f" in {plan.view.path}"
    return (
        f"input-side LN of W '{plan.weight.name}' hoisted over {n} steps of '{plan.source.name}'{where} "
        f"({' + '.join(parts)} -> {after})"
    )
