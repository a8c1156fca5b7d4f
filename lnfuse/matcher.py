"""Find normalization candidates by walking forward from a reduction's input.

Anchors are the model's ``ReduceMean`` / ``ReduceSum`` nodes (from the op-type
index). Each anchor proposes an input ``X`` and a set of normalized axes: the
reduction's own input, or, when that input is ``x*x`` / ``x**2``, ``x`` itself
(RMS norm and one-pass variance start there). Each ``(X, axes)`` is walked once.

The walk evaluates, with :mod:`lnfuse.symbolic`, every node reachable from ``X``
through the modelled element-wise ops, reductions and float Casts whose other
inputs are constants, stopping after a fixed number of nodes. A tensor whose
value is a complete normalization of ``X`` is a candidate output ``T``; its match
is the backward cone of ``T`` down to ``X`` and constants. A candidate is kept
only if no tensor of the match other than ``T`` is read outside it or is a graph
output, the whole match lives in one graph, and it does not compute the centred
value as ``mean - x``. The deepest candidate that passes wins; further disjoint
candidates of the same walk (two norms of one input) are kept too.

The cost is bounded per anchor (``MAX_EVAL`` node evaluations), so matching is
linear in the number of reductions in the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from lnfuse import ir, shapes
from lnfuse import symbolic as S
from lnfuse import views as V
from lnfuse.graph import FLOAT_TYPES, GraphView, ModelGraph, node_label

MAX_EVAL = 64
# The walker's constant caches (float64 copies of the constants walks read) are cleared when they
# reach this many entries: walks of one block read its own gamma/beta, so a model-wide cache only
# grows (about 2 KB a block), while the constants that blocks share (eps, exponents) are refilled
# at once.
CONST_CACHE_LIMIT = 1024
ALGEBRA_OPS = frozenset(
    {
        "Identity",
        "Cast",
        "Neg",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Reciprocal",
        "Sqrt",
        "Pow",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "GlobalAveragePool",
        "Unsqueeze",
        "Squeeze",
        "Reshape",
        "BatchNormalization",
        "Max",
    }
)
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool")
SUM_OPS = ("ReduceSum", "ReduceSumSquare")  # a sum over the normalized axes, not a mean
SQUEEZED = S.Flag.SQUEEZED  # a keepdims=0 reduction, not yet unsqueezed


@dataclass
class Candidate:
    """One complete normalization found in the graph (not yet checked)."""

    view: GraphView
    x: ir.Tensor
    axes: tuple[int, ...]  # negative axes when the rank is known or they were given negative
    rank: int | None
    output: ir.Tensor
    nodes: list[ir.Node]  # the match, in graph order; nodes[-1] produces ``output``
    form: S.NormForm
    valued: frozenset[int]  # ids of the tensors the walk gave a value (the Syms themselves are not kept)
    const_inputs: list[ir.Tensor]
    flags: frozenset[str]
    axes_positive: bool = False
    side_outputs: list[tuple[str, ir.Tensor]] = field(default_factory=list)  # ("mean"|"inv_std", tensor)
    x_aliases: list[ir.Node] = field(default_factory=list)  # duplicate Casts producing copies of x
    group: int | None = None  # candidates sharing nodes: rewritten all together or not at all
    side_nodes: list[ir.Node] = field(default_factory=list)  # outside readers that compute only those

    def settled(self) -> Candidate:
        """A copy for the rewrite, which reads only the match's nodes and tensors and its group:
        the walk's ``valued`` ids, ``flags`` and ``form`` (what the check and the proof read) go,
        ``form`` for a placeholder of its kind. Accepted candidates wait for the rewrite phase
        together; on the 110k-node chain these were two thirds of what they held."""
        spent = Candidate.__new__(Candidate)  # a field-for-field copy (dataclasses.replace: 10 us)
        spent.__dict__.update(self.__dict__)
        spent.valued = spent.flags = NO_FLAGS
        spent.form = _SPENT_FORMS[self.form.kind]
        return spent


NO_FLAGS: frozenset = frozenset()  # shared: every frozenset() is an object of its own (216 B)
SPENT = np.zeros(0)  # the coefficients of a settled candidate's form, and values a rewrite no longer reads
_SPENT_FORMS = {k: S.NormForm(k, S.EDef(k, float("nan"), float("nan")), SPENT, None) for k in S.NormKind}


@dataclass
class Refusal:
    """Why a normalization-looking subgraph was left alone."""

    reason: str
    nodes: list[str]
    anchor: str
    graph: str = "main"


class _Step(NamedTuple):
    """What one node of the walk came to."""

    evaluated: bool  # admitted and evaluated (counts against MAX_EVAL)
    why: str  # why the walk stops at it ("" when it does not, or says nothing)
    walked: bool  # its output has a value: the walk goes on from there


_WALKED = _Step(True, "", True)
_EVALUATED = _Step(True, "", False)  # evaluated to exactly zero: counts, but the walk stops there


@dataclass
class WalkResult:
    candidates: list[Candidate] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    note: str = ""  # why the walk found nothing (when it has neither candidates nor refusals)


def _mean_minus_x(out: ir.Tensor, values: dict[int, S.Sym]) -> str:
    """Why a match may not contain ``out``: its centred value is written as ``mean - x``."""
    value = values.get(id(out))
    if value is not None and S.is_negated_centering(value):
        return f"centred value '{out.name}' is computed as mean - x, not x - mean"
    return ""


def _candidate(
    view: GraphView,
    x: ir.Tensor,
    axes: tuple[int, ...],
    rank: int | None,
    t: ir.Tensor,
    cone: list[ir.Node],
    form: S.NormForm,
    values: dict[int, S.Sym],
    consts: list[ir.Tensor],
    extra_flag: str | None = None,
) -> Candidate:
    """A candidate whose flags gather those of its E atom and of every value in its match."""
    flags: set[str] = set(form.edef.flags)
    if extra_flag:
        flags.add(extra_flag)
    for n in cone:
        flags |= values[id(n.outputs[0])].flags
    return Candidate(
        view=view,
        x=x,
        axes=axes,
        rank=rank,
        output=t,
        nodes=cone,
        form=form,
        valued=frozenset(values),
        const_inputs=consts,
        flags=frozenset(flags),
    )


def reduce_axes(mg: ModelGraph, node: ir.Node) -> tuple[list[int] | None, bool]:
    """``(axes, ok)`` of a Reduce node: attribute (opset < 18) or constant input; None axes = all.

    ``GlobalAveragePool`` is the mean over axes ``2 .. rank-1`` (tf2onnx writes it for such a
    ReduceMean), known once the input's rank is."""
    if node.op == "GlobalAveragePool":
        shape = mg.shape(node.inputs[0])
        if shape is None or len(shape) < 3:
            return None, False
        return list(range(2, len(shape))), True
    if len(node.inputs) > 1 and node.inputs[1].name:
        val = mg.const_value(node.inputs[1])
        if val is None:
            return None, False
        axes = [int(a) for a in np.asarray(val).reshape(-1)]
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return None, False
            return None, True
        return axes, True
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]], True
    if node.attrs.get("noop_with_empty_axes", 0):
        return None, False
    return None, True


def normalize_axes(axes: list[int] | None, rank: int | None) -> tuple[int, ...] | None:
    """Axes as sorted negative ints; None when that cannot be known (positive axes, unknown rank)."""
    if axes is None:
        if rank is None:
            return None
        return tuple(range(-rank, 0))
    if all(a < 0 for a in axes):
        out = sorted(set(axes))
        if rank is not None and out[0] < -rank:
            return None
        return tuple(out)
    if rank is None:
        return None
    if any(a >= rank or a < -rank for a in axes):
        return None
    return tuple(sorted({a - rank if a >= 0 else a for a in axes}))


_SHAPE_ARG_OPS = frozenset((*REDUCE_OPS, "Unsqueeze", "Squeeze", "Reshape"))
# What a count or a target shape is computed with, from Shape / Size of a tensor in the match.
_SHAPE_CHAIN_OPS = frozenset(
    {"Shape", "Size", "Gather", "Slice", "Concat", "ReduceProd", "Cast", "Squeeze", "Unsqueeze"}
    | {"Add", "Sub", "Mul", "Div", "Neg", "Range", "ConstantOfShape"}
)


class Walker:
    """Runs the bounded forward walk for every anchor of one kind of reduction."""

    def __init__(self, mg: ModelGraph) -> None:
        self.mg = mg
        self._const_sym: dict[int, S.Sym | None] = {}
        self._const_keys: dict[int, tuple[tuple[tuple[int, ...], bytes], np.ndarray] | None] = {}
        # Per walk (reset by walk(): a cone depends on that walk's values).
        self._cone_cache: dict[tuple[int, int], tuple[list[ir.Node], list[ir.Tensor], str]] = {}
        self._alias_ids: set[int] = set()
        self._cone_consts: dict[int, tuple[ir.Tensor, ...]] = {}

    # -- proposals --------------------------------------------------------------
    def proposals(
        self, kind: S.NormKind = S.NormKind.LN
    ) -> list[tuple[ir.Tensor, tuple[int, ...], int | None, ir.Node, bool, dict[int, V.View]]]:
        """``(X, axes, rank, anchor, positive, views)`` for every reduction anchor, deduplicated
        (``views``: reshaped views of X the walk enters, by tensor id).

        A layer norm always reduces ``x`` itself (its mean), so for ``NormKind.LN`` the
        anchor's input is ``x``; an RMS norm only reduces ``x**2``, so for ``NormKind.RMS``
        ``x`` is the operand of the square feeding the reduction.
        """
        seen: set[tuple[int, tuple[int, ...]]] = set()
        out: list[tuple[ir.Tensor, tuple[int, ...], int | None, ir.Node, bool, dict[int, V.View]]] = []
        later: list[tuple[ir.Tensor, tuple[int, ...], int | None, ir.Node, bool, dict[int, V.View]]] = []
        for view in self.mg.views:
            for op in REDUCE_OPS:
                for node in view.nodes_by_op.get(op, ()):
                    if node.domain or not node.inputs:
                        continue
                    # The reduction's input is x (a mean), or x**2 (a variance / RMS): then x is
                    # the square's operand, and the square itself is never proposed.
                    xs = [node.inputs[0]]
                    src = self.mg.producer(node.inputs[0])
                    square_of = node.inputs[0] if op == "ReduceSumSquare" else None
                    if square_of is None and src is not None and not src.domain:
                        if src.op == "Mul" and len(src.inputs) == 2 and src.inputs[0] is src.inputs[1]:
                            square_of = src.inputs[0]
                        elif src.op == "Pow" and len(src.inputs) == 2:
                            p = self.mg.const_value(src.inputs[1])
                            if p is not None and S.scalar_of(np.asarray(p, dtype=np.float64)) == 2.0:
                                square_of = src.inputs[0]
                    if square_of is not None:
                        xs = [square_of] if kind is S.NormKind.RMS else []
                    elif kind is S.NormKind.RMS:
                        xs = []
                    raw_axes, ok = reduce_axes(self.mg, node)
                    if not ok:
                        continue
                    for x in xs:
                        through = V.entry(self.mg, x, raw_axes)
                        if through is not None:
                            # x may be a reshaped view of the tensor really normalized (tf_keras):
                            # walked after x itself, which keeps an ordinary reshape ordinary.
                            x0, axes0, layout = through
                            key = (id(x0), axes0)
                            if key not in seen:
                                seen.add(key)
                                later.append((x0, axes0, None, node, False, {id(x): layout}))
                        rank = None
                        axes = normalize_axes(raw_axes, None)
                        if axes is None:
                            shape = self.mg.shape(x)
                            rank = len(shape) if shape is not None else None
                            axes = normalize_axes(raw_axes, rank)
                        if axes is None:
                            continue
                        key = (id(x), axes)
                        if key in seen:
                            continue
                        seen.add(key)
                        positive = raw_axes is not None and all(a >= 0 for a in raw_axes)
                        out.append((x, axes, rank, node, positive, {}))
        return out + later

    # -- the walk ---------------------------------------------------------------
    def walk(
        self,
        x: ir.Tensor,
        axes: tuple[int, ...],
        rank: int | None,
        anchor: ir.Node,
        positive: bool = False,
        views: dict[int, V.View] | None = None,
    ) -> WalkResult:
        ctx = S.Context(n_norm=None)
        self._entry_views = views or {}
        self._layout: dict[int, V.View] = {}  # tensor id -> the view it is in (absent: X's layout)
        self._n_norm_args = (x, axes, rank)
        self._n_norm_done = False
        values: dict[int, S.Sym] = {id(x): S.Sym.atom("X")}
        # Exporters may cast the same tensor twice (T5 in fp16: one Cast feeds the statistics, a
        # second the final Mul): identical Casts of x's source are x too.
        aliases = self._aliases(x)
        self._alias_ids = {id(x)} | {id(a.outputs[0]) for a in aliases}
        for a in aliases:
            values[id(a.outputs[0])] = S.Sym.atom("X")
        order: list[ir.Tensor] = []
        done: set[int] = set()
        failures: list[tuple[ir.Node, str]] = []
        # Per evaluated tensor, the constants its cone reads (as _cone would list them, with
        # repeats): what the purity preference compares scale and bias against.
        cone_consts: dict[int, tuple[ir.Tensor, ...]] = {}
        self._cone_consts = cone_consts
        self._cone_cache = {}
        queue: list[ir.Tensor] = [x, *(a.outputs[0] for a in aliases)]
        evals = 0
        qi = 0
        while qi < len(queue) and evals < MAX_EVAL:
            t = queue[qi]
            qi += 1
            for node in t.outputs:
                if id(node) in done or node.op not in ALGEBRA_OPS or node.domain:
                    continue
                step = self._step(node, values, cone_consts, axes, rank, ctx)
                if step is None:
                    continue  # an input is neither walked nor constant (yet)
                done.add(id(node))
                evals += step.evaluated
                if step.why:
                    failures.append((node, step.why))
                if step.walked:
                    order.append(node.outputs[0])
                    queue.append(node.outputs[0])
        res = self._select(x, axes, rank, anchor, ctx, values, order, failures)
        if not res.candidates and not res.refusals:
            res.note = (
                "; ".join(f"{node_label(n)}: {why}" for n, why in failures[:2])
                or "its value never combines into a normalization of its input"
            )
        for cand in res.candidates:
            cand.axes_positive = positive
            cand.x_aliases = [
                a for a in aliases if any(id(n) in {id(m) for m in cand.nodes} for n in a.outputs[0].outputs)
            ]
        return res

    def _step(
        self,
        node: ir.Node,
        values: dict[int, S.Sym],
        cone_consts: dict[int, tuple[ir.Tensor, ...]],
        axes: tuple[int, ...],
        rank: int | None,
        ctx: S.Context,
    ) -> _Step | None:
        """Evaluate one node of the walk, recording its output's value; None when an input has
        no value yet (the node is tried again when one arrives)."""
        gathered = self._gather(node, values, cone_consts)
        if gathered is None:
            return None
        inputs, reads, squeezed = gathered
        layout, why_not = self._admit(node, inputs, squeezed, values)
        if why_not:
            return _Step(False, why_not, False)
        self._next_layout = layout
        try:
            result, why = self._eval(node, inputs, axes, rank, ctx)
        except (ValueError, ZeroDivisionError, OverflowError, FloatingPointError) as err:
            result, why = None, f"cannot evaluate: {err}"
        if result is None:
            return _Step(True, why, False)
        if not result.terms:
            # Exactly zero in real arithmetic (e.g. the mean of an already centred value) is
            # rounding noise in floating point: never build on it.
            return _EVALUATED
        out_t = node.outputs[0]
        values[id(out_t)] = result
        if self._next_layout is not None:
            self._layout[id(out_t)] = self._next_layout
        cone_consts[id(out_t)] = reads
        return _WALKED

    def _admit(
        self, node: ir.Node, inputs: list[S.Sym], squeezed: bool, values: dict[int, S.Sym]
    ) -> tuple[V.View | None, str]:
        """The layout ``node``'s walked inputs share (None: X's own), or why the walk stops there."""
        # No tensor of this walk is in a reshaped view: every walked input is in X's own layout.
        layout, why = self._input_layout(node, values) if self._layout else (None, "")
        if why:
            return None, why
        if (
            squeezed
            and node.op not in ("Unsqueeze", "Reshape", "BatchNormalization")
            and not all(
                SQUEEZED in i.flags or (i.is_const() and self._scalar_const(t))
                for i, t in zip(inputs, node.inputs, strict=False)
            )
        ):
            # A keepdims=0 statistic may meet scalars (/ (N - 1), + eps) before it is
            # unsqueezed; meeting anything shaped like x would broadcast it wrongly.
            return None, "reduction with keepdims=0 no longer broadcasts per row"
        return layout, ""

    def _gather(
        self, node: ir.Node, values: dict[int, S.Sym], cone_consts: dict[int, tuple[ir.Tensor, ...]]
    ) -> tuple[list[S.Sym], tuple[ir.Tensor, ...], bool] | None:
        """(the input values of ``node``, the constants in the cone of its output, whether an input
        is a keepdims=0 statistic), or None when an input has no value."""
        inputs: list[S.Sym] = []
        squeezed = False
        shape_args = node.op in _SHAPE_ARG_OPS
        reads: tuple[ir.Tensor, ...] = ()
        for idx, inp in enumerate(node.inputs):
            sym = values.get(id(inp))
            if sym is None and idx and node.op == "Reshape":
                sym = S.Sym({})  # a target shape: read by the evaluator itself
            elif sym is None and node.op == "BatchNormalization" and idx in (1, 2):
                fill = V.scalar_fill(self.mg, inp)
                if fill is None:
                    return None
                sym = S.Sym.const(np.asarray(fill))
            elif sym is None:
                sym = self._const(inp)
                if sym is None:
                    return None
                if not (idx and shape_args):
                    reads += (inp,)
            else:
                reads += cone_consts.get(id(inp), ())
                if sym.flags and SQUEEZED in sym.flags:
                    squeezed = True
            inputs.append(sym)
        return inputs, reads, squeezed

    def _aliases(self, x: ir.Tensor) -> list[ir.Node]:
        """Other ``Cast`` nodes that cast x's source to x's type (x itself produced by a Cast)."""
        p = self.mg.producer(x)
        if p is None or p.op != "Cast" or p.domain or not p.inputs:
            return []
        to = p.attrs.get("to")
        return [
            c
            for c in p.inputs[0].outputs
            if c is not p
            and c.op == "Cast"
            and not c.domain
            and c.attrs.get("to") == to
            and len(c.outputs) == 1
        ]

    def _norm_count(self, x: ir.Tensor, axes: tuple[int, ...], rank: int | None) -> int | None:
        shape = self.mg.shape(x)
        if shape is None:
            tail = shapes.trailing(self.mg, x)  # static trailing dims, rank unknown
            if not tail or -min(axes) > len(tail):
                return None
            return int(np.prod([tail[a] for a in axes]))
        n = 1
        for a in axes:
            if -a > len(shape):
                return None
            d = shape[a]
            if not isinstance(d, int):
                return None
            n *= d
        return n

    def _const(self, t: ir.Tensor) -> S.Sym | None:
        key = id(t)
        if key not in self._const_sym:
            if len(self._const_sym) >= CONST_CACHE_LIMIT:
                self._const_sym.clear()
            val = self.mg.const_value(t)
            if val is None or val.dtype.kind not in "fiub":
                self._const_sym[key] = None
            else:
                self._const_sym[key] = S.Sym.const(val.astype(np.float64))
        return self._const_sym[key]

    def _eval(
        self, node: ir.Node, ins: list[S.Sym], axes: tuple[int, ...], rank: int | None, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        """The value of ``node``'s first output from its inputs' values (None, why: not modelled)."""
        evaluate = _EVALUATORS.get(node.op)
        return (None, "") if evaluate is None else evaluate(self, node, ins, axes, rank, ctx)

    # -- one evaluator per op (the table _EVALUATORS below) ------------------------------------
    def _ev_identity(self, node: ir.Node, ins: list[S.Sym], *_: object) -> tuple[S.Sym | None, str]:
        return ins[0], ""

    def _ev_cast(self, node: ir.Node, ins: list[S.Sym], *_: object) -> tuple[S.Sym | None, str]:
        to = int(node.attrs.get("to", 0))
        if to not in FLOAT_TYPES:
            return None, "Cast to a non-float type"
        src = self.mg.dtype(node.inputs[0])
        if src is not None and src not in FLOAT_TYPES:
            return None, "Cast from a non-float type"
        return ins[0].with_flags(S.Flag.CAST), ""

    def _ev_neg(self, node: ir.Node, ins: list[S.Sym], *_: object) -> tuple[S.Sym | None, str]:
        return S.neg(ins[0]), ""

    def _ev_add_sub(self, node: ir.Node, ins: list[S.Sym], *_: object) -> tuple[S.Sym | None, str]:
        if len(ins) != 2:
            return None, ""
        return S.add(ins[0], ins[1], 1.0 if node.op == "Add" else -1.0), ""

    def _ev_mul(self, node: ir.Node, ins: list[S.Sym], *_: object) -> tuple[S.Sym | None, str]:
        if len(ins) != 2:
            return None, ""
        res = S.mul(ins[0], ins[1])
        if res is not None and node.inputs[0] is node.inputs[1]:
            res = res.with_flags(*self._square_flags(node))
        return res, ""

    def _ev_div(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        inv = S.reciprocal(ins[1], ctx)
        if inv is None:
            return None, "divisor is not a constant or a positive power of (variance + eps)"
        return S.mul(ins[0], inv), ""

    def _ev_reciprocal(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        res = S.reciprocal(ins[0], ctx)
        return res, "" if res is not None else "Reciprocal of something other than (variance + eps)"

    def _ev_sqrt(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        res = S.power(ins[0], 0.5, ctx)
        return res, "" if res is not None else "Sqrt of something other than (variance + eps)"

    def _ev_pow(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        p = S.scalar_of(ins[1].terms.get(S.ONE, np.asarray(0.0))) if ins[1].is_const() else None
        if p is None or not np.isfinite(p):
            return None, "Pow exponent is not a constant scalar"
        scaled = p * 64.0
        if scaled != int(scaled):
            return None, f"Pow exponent {p} is not a multiple of 1/64"
        frac = float(p)
        if frac != 2 and frac == int(frac) and abs(frac) != 1:
            return None, f"Pow exponent {p} (only 2 squares a value)"
        res = S.power(ins[0], frac, ctx)
        if res is not None and frac == 2:
            res = res.with_flags(*self._square_flags(node))
        return res, "" if res is not None else f"Pow({p}) of something other than (variance + eps)"

    def _ev_reduce(
        self, node: ir.Node, ins: list[S.Sym], axes: tuple[int, ...], rank: int | None, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        op = node.op
        raw_axes, ok = reduce_axes(self.mg, node)
        if not ok:
            return None, f"{op} axes are not constant"
        squeezed = int(node.attrs.get("keepdims", 1)) != 1
        if SQUEEZED in ins[0].flags:
            # Its axes now index a tensor of lower rank: not the normalized axes any more.
            return None, f"{op} of a keepdims=0 statistic reduces other axes"
        why = self._reduces_normalized_axes(node, raw_axes, squeezed, axes, rank)
        if why:
            return None, why
        arg = S.mul(ins[0], ins[0]) if op == "ReduceSumSquare" else ins[0]
        res = None if arg is None else S.reduce_mean(arg)
        if res is None:
            return None, f"{op} of a value that is not linear in x and x**2"
        if op in SUM_OPS:
            if not self._n_norm_done:
                self._n_norm_done = True
                ctx.n_norm = self._norm_count(*self._n_norm_args)
            if ctx.n_norm is None:
                return None, "ReduceSum over axes of unknown size"
            res = S.mul(res, S.Sym.const(np.asarray(float(ctx.n_norm))))
            if res is not None:
                res = res.with_flags(S.Flag.REDUCE_SUM)
        if squeezed and res is not None:
            # keepdims=0: usable only once an Unsqueeze / Reshape puts the reduced axes back.
            res = res.with_flags(SQUEEZED)
        return res, ""

    def _reduces_normalized_axes(
        self,
        node: ir.Node,
        raw_axes: list[int] | None,
        squeezed: bool,
        axes: tuple[int, ...],
        rank: int | None,
    ) -> str:
        """Why a reduction does not reduce the normalized axes (of X, or of the view it reads)."""
        view = self._next_layout
        if view is not None:
            if not view.reduces_rows(raw_axes) or (squeezed and not view.squeezes_rows(raw_axes)):
                return f"{node.op} over axes {raw_axes} of a reshaped view, not its normalized axes"
            return ""
        naxes = normalize_axes(raw_axes, rank)
        if naxes is None and rank is None:
            shape = self.mg.shape(node.inputs[0])
            naxes = normalize_axes(raw_axes, len(shape) if shape is not None else None)
        if naxes != axes:
            return f"{node.op} over axes {raw_axes}, not the normalized axes {list(axes)}"
        return ""

    def _ev_unsqueeze_reshape(
        self, node: ir.Node, ins: list[S.Sym], axes: tuple[int, ...], *_: object
    ) -> tuple[S.Sym | None, str]:
        if node.op == "Reshape" and SQUEEZED not in ins[0].flags:
            return self._reshape_view(node, ins[0])
        if SQUEEZED not in ins[0].flags or self._next_layout is not None:
            return None, ""
        if not self._restores_reduced_axes(node, axes):
            return None, f"{node.op} does not put the reduced axes {list(axes)} back"
        return S.Sym(ins[0].terms, ins[0].flags - {SQUEEZED}), ""

    def _ev_squeeze(
        self, node: ir.Node, ins: list[S.Sym], axes: tuple[int, ...], *_: object
    ) -> tuple[S.Sym | None, str]:
        return self._squeeze(node, ins[0], axes)

    def _ev_max(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        return self._clamp_at_zero(node, ins, ctx)

    def _ev_batch_norm(
        self, node: ir.Node, ins: list[S.Sym], axes: object, rank: object, ctx: S.Context
    ) -> tuple[S.Sym | None, str]:
        return self._batch_norm(node, ins, ctx)

    def _input_layout(self, node: ir.Node, values: dict[int, S.Sym]) -> tuple[V.View | None, str]:
        """The layout the walked inputs of ``node`` share (None: X's own) and why not, if they don't."""
        found = [self._layout.get(id(t)) for t in node.inputs if id(t) in values]
        view = found[0] if found else None
        if any(v is not view for v in found):
            return None, "mixes a reshaped view of the input with the input itself"
        if view is None or node.op == "BatchNormalization":
            return view, ""
        for idx, t in enumerate(node.inputs):
            if id(t) in values or (idx and node.op in _SHAPE_ARG_OPS):
                continue
            if not self._scalar_const(t):
                return None, "a constant that is not a scalar meets a reshaped view of the input"
        return view, ""

    def _reshape_view(self, node: ir.Node, value: S.Sym) -> tuple[S.Sym | None, str]:
        """A Reshape into a view of X the walk was told about, or back from a view to X's shape."""
        out_id = id(node.outputs[0])
        if self._next_layout is None and out_id in self._entry_views:
            self._next_layout = self._entry_views[out_id]
            return value, ""
        if self._next_layout is not None:
            if V.restores(self.mg, node, self._n_norm_args[0], self._next_layout):
                self._next_layout = None
                return value, ""
            return None, "Reshape of a reshaped view to something other than the input's shape"
        target = shapes.reshape_target(self.mg, node)
        if target is not None and target == shapes.shape_of(self.mg, node.inputs[0]):
            return value, ""  # to its own shape (a Transpose tf2onnx turned into a Reshape)
        return None, ""

    def _squeeze(self, node: ir.Node, value: S.Sym, axes: tuple[int, ...]) -> tuple[S.Sym | None, str]:
        """Squeeze of a keepdims=1 statistic over exactly the reduced axes: a keepdims=0 statistic."""
        if SQUEEZED in value.flags or any(a == "X" for m in value.terms for a, _ in m):
            return None, ""
        if len(node.inputs) > 1:
            v = self.mg.const_value(node.inputs[1])
            sq = None if v is None else [int(a) for a in v.reshape(-1)]
        else:
            sq = [int(a) for a in node.attrs.get("axes", [])] or None
        view = self._next_layout
        if view is not None:
            ok = view.squeezes_rows(sq)
        else:
            shape = self.mg.shape(self._n_norm_args[0])
            ok = sq is not None and normalize_axes(sq, None if shape is None else len(shape)) == axes
        if not ok:
            return None, f"Squeeze over {sq}, not the reduced axes"
        return value.with_flags(SQUEEZED), ""

    def _clamp_at_zero(self, node: ir.Node, ins: list[S.Sym], ctx: S.Context) -> tuple[S.Sym | None, str]:
        """``Max(v, 0)`` of a variance (+ eps): the same value (a variance is >= 0; the
        clamp only catches negative rounding of a one-pass ``E[x^2] - E[x]^2``, as JAX writes it)."""
        if node.op == "Max" and (len(ins) != 2 or ins[1].terms or not self._scalar_const(node.inputs[1])):
            return None, ""
        v = ins[0]
        if S.atomize(v, ctx) is None and S.power(v, -2.0, ctx) is None:
            return None, f"{node.op} of something other than a variance"
        return v, ""

    def _batch_norm(self, node: ir.Node, ins: list[S.Sym], ctx: S.Context) -> tuple[S.Sym | None, str]:
        """``(x - mean) / sqrt(var + eps) * scale + B`` with per-row statistics of a view of X."""
        why = V.batch_norm_ok(self.mg, node)
        if why:
            return None, why
        view = self._next_layout
        if view is None or not view.channel_rows():
            return None, "BatchNormalization whose channels are not the rows of a reshaped view of the input"
        xv, scale, bias, mean, var = ins
        if SQUEEZED in xv.flags or SQUEEZED not in mean.flags or SQUEEZED not in var.flags:
            return None, "BatchNormalization not fed by per-row statistics of its input"
        m = S.Sym(mean.terms, mean.flags - {SQUEEZED})
        v = S.Sym(var.terms, var.flags - {SQUEEZED})
        eps = S.Sym.const(np.asarray(float(node.attrs.get("epsilon", 1e-5))))
        d, e = S.add(xv, m, -1.0), S.add(v, eps)
        r = None if e is None else S.power(e, -0.5, ctx)
        if d is None or r is None:
            return None, "BatchNormalization's variance is not a variance of its input"
        y = S.mul(d, r)
        y = None if y is None else S.mul(y, scale)
        return (None if y is None else S.add(y, bias)), ""

    def _scalar_const(self, t: ir.Tensor) -> bool:
        v = self.mg.const_value(t)
        return v is not None and v.size == 1 and v.ndim <= 1

    def _restores_reduced_axes(self, node: ir.Node, axes: tuple[int, ...]) -> bool:
        """``node`` (Unsqueeze / Reshape of a keepdims=0 reduction) gives the keepdims=1 shape."""
        x = self._n_norm_args[0]
        if node.op == "Unsqueeze":
            if len(node.inputs) > 1:
                v = self.mg.const_value(node.inputs[1])
                un = None if v is None else [int(a) for a in v.reshape(-1)]
            else:
                un = [int(a) for a in node.attrs.get("axes", [])] or None
            if un is None:
                return False
            if all(a < 0 for a in un):
                return tuple(sorted(un)) == axes
            shape = self.mg.shape(x)
            if shape is None:
                return False
            r = len(shape)
            return tuple(sorted(a - r if a >= 0 else a for a in un)) == axes
        target = self.mg.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        shape = self.mg.shape(x)
        if target is None or shape is None or not all(isinstance(d, int) for d in shape):
            return False
        if int(node.attrs.get("allowzero", 0)):
            return False
        want = [1 if (i - len(shape)) in axes else int(d) for i, d in enumerate(shape)]  # type: ignore[arg-type]
        return [int(d) for d in target.reshape(-1)] == want

    def _square_flags(self, node: ir.Node) -> tuple[str, ...]:
        dt = self.mg.dtype(node.outputs[0]) if node.outputs else None
        return (S.Flag.FP16_SQUARE,) if dt in (10, 16) else ()

    # -- choosing outputs ---------------------------------------------------------
    def _select(
        self,
        x: ir.Tensor,
        axes: tuple[int, ...],
        rank: int | None,
        anchor: ir.Node,
        ctx: S.Context,
        values: dict[int, S.Sym],
        order: list[ir.Tensor],
        failures: list[tuple[ir.Node, str]],
    ) -> WalkResult:
        result = WalkResult()
        claimed: set[int] = set()
        # Complete norms, deepest first; each one's NormForm is worked out only when needed
        # (None: not a norm after all, or it ends in a widening Cast).
        deep = [t for t in reversed(order) if S.maybe_norm(values[id(t)]) and id(t) not in self._layout]
        forms: dict[int, S.NormForm | None] = {}

        def form_of(t: ir.Tensor) -> S.NormForm | None:
            key = id(t)
            if key not in forms:
                f = S.as_norm(values[key], ctx)
                forms[key] = f if f is not None and not self._widening_cast(t) else None
            return forms[key]

        # Prefer the deepest output whose scale and bias are original constants
        # (so LN -> Add(beta) -> Add(other_bias) stops at beta); else the deepest.
        # Purity is tested from the deepest down, and only as far as needed.
        purity: dict[int, bool] = {}

        def pure(t: ir.Tensor, form: S.NormForm) -> bool:
            key = id(t)
            if key not in purity:
                purity[key] = self._pure(form, t)
            return purity[key]

        first_pure = next(
            (i for i, t in enumerate(deep) if (f := form_of(t)) is not None and pure(t, f)),
            None,
        )
        seq = deep if first_pure is None else deep[first_pure:]
        last_reason = ""
        last_nodes: list[str] = []
        leaked_before_first = False  # a deeper complete norm did not close (shared with another?)
        for t in seq:
            if t.inputs and id(t.inputs[0]) in claimed:
                continue  # inside a match already taken
            form = form_of(t)
            if form is None or (first_pure is not None and not pure(t, form)):
                continue
            taken = self._take(x, axes, rank, t, form, values, ctx, claimed)
            if isinstance(taken, Candidate):
                claimed |= {id(n) for n in (*taken.nodes, *taken.side_nodes)}
                result.candidates.append(taken)
            elif taken is not None:
                why, cone, leaked = taken
                if not last_reason:
                    last_reason, last_nodes = why, [node_label(n) for n in cone]
                leaked_before_first = leaked_before_first or (leaked and not result.candidates)
        if not result.candidates or leaked_before_first:
            complete = [(t, f) for t in reversed(seq) if (f := form_of(t)) is not None]
            if len(complete) >= 2:
                # Exporters (CSE) share the mean, the centred value, the variance and even the
                # normalized value between two norms of one input, each with its own gamma/beta;
                # together the matches close even though neither does alone. A group of two or more
                # wins over one shallower norm that leaves both affine tails outside.
                group = self._group(x, axes, rank, complete, values)
                if group:
                    result.candidates = group
        if not result.candidates and self._looks_like_ln(ctx, values, failures):
            # It computed a variance-like statistic but never became a normalization.
            result.refusals.append(self._refusal(anchor, last_reason, last_nodes, failures))
        return result

    def _take(
        self,
        x: ir.Tensor,
        axes: tuple[int, ...],
        rank: int | None,
        t: ir.Tensor,
        form: S.NormForm,
        values: dict[int, S.Sym],
        ctx: S.Context,
        claimed: set[int],
    ) -> Candidate | tuple[str, list[ir.Node], bool] | None:
        """The candidate ending at ``t``; else (why not, its nodes, whether the match leaked out),
        or None when it overlaps a match already taken."""
        cone, consts, why = self._cone(x, t, values)
        if why:
            return why, cone, False
        if any(id(n) in claimed for n in cone):
            return None
        cone_ids = {id(n) for n in cone}
        side, side_nodes, leak = self._closure(t, cone, cone_ids, form, values, ctx)
        if leak:
            return leak, cone, True
        mg = self.mg
        if len({id(mg.view_of(n)) for n in cone}) != 1:
            return "match spans a subgraph boundary", cone, False
        view = mg.view_of(cone[-1])
        assert view is not None
        cand = _candidate(view, x, axes, rank, t, cone, form, values, consts)
        cand.side_outputs = list(side.values())
        cand.side_nodes = side_nodes
        return cand

    def _refusal(
        self, anchor: ir.Node, reason: str, nodes: list[str], failures: list[tuple[ir.Node, str]]
    ) -> Refusal:
        """The refusal of a walk that computed statistics but no norm: the first reason a complete
        output failed for, else where the walk stopped."""
        if not reason:
            tail = [f"{node_label(n)}: {why}" for n, why in failures[:3]]
            reason = (
                "; ".join(tail)
                if tail
                else "the statistics never combine into (x - mean) / sqrt(var + eps) * gamma + beta"
            )
            nodes = [node_label(n) for n, _ in failures[:3]]
        view = self.mg.view_of(anchor)
        return Refusal(
            reason=reason, nodes=nodes, anchor=node_label(anchor), graph=view.path if view else "main"
        )

    def _closure(
        self,
        t: ir.Tensor,
        cone: list[ir.Node],
        cone_ids: set[int],
        form: S.NormForm,
        values: dict[int, S.Sym],
        ctx: S.Context,
    ) -> tuple[dict[int, tuple[str, ir.Tensor]], list[ir.Node], str]:
        """(side outputs, side nodes, why not): the match must close, only its output ``t`` seen
        from outside. The one exception (allowed later only for an ONNX function expansion, see
        rules.check) are tensors that are exactly the mean or 1/sqrt(var + eps):
        LayerNormalization's own optional outputs, and outside readers that only compute those or
        only read a shape."""
        mg = self.mg
        side: dict[int, tuple[str, ir.Tensor]] = {}
        side_nodes: list[ir.Node] = []
        leak = ""
        for n in list(cone):
            for out in n.outputs:
                if out is t:
                    continue
                outside = [c for c in out.outputs if id(c) not in cone_ids]
                is_output = mg.is_graph_output(out)
                if not outside and not is_output:
                    leak = _mean_minus_x(out, values)  # read only inside the match: all there is to check
                    if leak:
                        break
                    continue
                kind = self._side_kind(values.get(id(out)), form, ctx)  # read outside, or an output
                if kind:
                    side[id(out)] = (kind, out)
                    continue
                if is_output:
                    leak = f"intermediate '{out.name}' is a graph output"
                    break
                shape_readers = [self._shape_chain(c, cone_ids) for c in outside]
                if outside and all(chain is not None for chain in shape_readers):
                    # Only its shape is read (Shape -> Gather -> ReduceProd -> Cast -> a count
                    # the match divides by): that chain goes with the match.
                    for chain in shape_readers:
                        side_nodes.extend(n2 for n2 in chain if all(n2 is not k for k in side_nodes))  # type: ignore[union-attr]
                    outside = []
                absorbed = []
                for c in outside:
                    c_kind = self._side_kind(values.get(id(c.outputs[0])) if c.outputs else None, form, ctx)
                    if (
                        c_kind
                        and len(c.outputs) == 1
                        and all(
                            id(i) in self._alias_ids or id(i) in values or self.mg.const_value(i) is not None
                            for i in c.inputs
                        )
                    ):
                        absorbed.append((c, c_kind))
                if len(absorbed) == len(outside):
                    for c, c_kind in absorbed:
                        side_nodes.append(c)
                        side[id(c.outputs[0])] = (c_kind, c.outputs[0])
                    outside = []
                if outside:
                    leak = (
                        f"intermediate '{out.name}' (from {n.op} '{n.name}') is also read by "
                        f"{outside[0].op} '{outside[0].name}' outside the match"
                    )
                    break
                leak = _mean_minus_x(out, values)
                if leak:
                    break
            if leak:
                break
        return side, side_nodes, leak

    def _shape_chain(self, reader: ir.Node, cone_ids: set[int]) -> list[ir.Node] | None:
        """``reader`` and the nodes after it when they only compute shape values that end in the
        match (``cone_ids``): Shape/Size, then shape arithmetic, never a graph output."""
        if reader.op not in ("Shape", "Size") or reader.domain:
            return None
        chain: list[ir.Node] = []
        stack = [reader]
        while stack:
            n = stack.pop()
            if any(n is c for c in chain):
                continue
            if n.op not in _SHAPE_CHAIN_OPS or n.domain or len(chain) >= 16:
                return None
            chain.append(n)
            for out in n.outputs:
                if self.mg.is_graph_output(out):
                    return None
                stack.extend(c for c in out.outputs if id(c) not in cone_ids)
        return chain

    @staticmethod
    def _looks_like_ln(ctx: S.Context, values: dict[int, S.Sym], failures: list[tuple[ir.Node, str]]) -> bool:
        """The walk computed a variance-like statistic (so a refusal is worth reporting)."""
        has_mean = any(any(a == "M" for m in v.terms for a, _ in m) for v in values.values())
        stats_failure = has_mean and any(
            n.op in ("Pow", "Sqrt", "Reciprocal", "Div", *REDUCE_OPS) for n, _ in failures
        )
        keepdims_failure = any("keepdims" in why for _, why in failures)
        return (
            stats_failure
            or keepdims_failure
            or any(e.kind is S.NormKind.LN for e in ctx.edefs)
            or any(
                any(a == "M" for m in v.terms for a, _ in m)
                and any(a.startswith("E") for m in v.terms for a, _ in m)
                for v in values.values()
            )
        )

    def _group(
        self,
        x: ir.Tensor,
        axes: tuple[int, ...],
        rank: int | None,
        complete: list[tuple[ir.Tensor, S.NormForm | None]],
        values: dict[int, S.Sym],
    ) -> list[Candidate]:
        """Several norms of ``x`` whose matches share nodes and close only as a union."""
        mg = self.mg
        picked: list[tuple[ir.Tensor, S.NormForm, list[ir.Node], list[ir.Tensor]]] = []
        union: set[int] = set()
        for t, form in reversed(complete):  # deepest (most complete) first
            if form is None or (t.inputs and id(t.inputs[0]) in union):
                continue
            cone, consts, why = self._cone(x, t, values)
            cone_ids = {id(n) for n in cone}
            if why or any(p[0].inputs and id(p[0].inputs[0]) in cone_ids for p in picked):
                continue
            picked.append((t, form, cone, consts))
            union |= {id(n) for n in cone}
        if len(picked) < 2:
            return []
        outputs = {id(p[0]) for p in picked}
        all_nodes = [n for p in picked for n in p[2]]
        views = {id(mg.view_of(n)) for n in all_nodes}
        if len(views) != 1:
            return []
        for n in all_nodes:
            for out in n.outputs:
                if id(out) in outputs:
                    continue
                if mg.is_graph_output(out) or any(id(c) not in union for c in out.outputs):
                    return []
                if S.is_negated_centering(values.get(id(out), S.Sym({}))):
                    return []
        view = mg.view_of(all_nodes[0])
        assert view is not None
        group_id = id(picked[0][0])
        cands = []
        for t, form, cone, consts in picked:
            cand = _candidate(
                view, x, axes, rank, t, cone, form, values, consts, extra_flag=S.Flag.SHARED_STATISTICS
            )
            cand.group = group_id
            cands.append(cand)
        return cands

    @staticmethod
    def _side_kind(sym: S.Sym | None, form: S.NormForm, ctx: S.Context) -> str:
        """ "mean" / "inv_std" when ``sym`` is exactly mean(x) / (var + eps)**-1/2 of this norm."""
        if sym is None or form.kind is not S.NormKind.LN or len(sym.terms) != 1:
            return ""
        ((mono, coef),) = sym.terms.items()
        if S.scalar_of(coef) != 1.0:
            return ""
        if mono == (("M", 1.0),):
            return "mean"
        if (
            len(mono) == 1
            and mono[0][0].startswith("E")
            and mono[0][1] == -0.5
            and form.edef.k == 1.0
            and ctx.edef(mono[0][0]) == form.edef
        ):
            return "inv_std"
        return ""

    def _widening_cast(self, t: ir.Tensor) -> bool:
        """True for a Cast to a wider float type at the tail: the norm ends before it."""
        p = t.inputs[0] if t.inputs else None
        if p is None or p.op != "Cast":
            return False
        rank = {10: 0, 16: 0, 1: 1, 11: 2}
        src, dst = self.mg.dtype(p.inputs[0]), self.mg.dtype(t)
        return src in rank and dst in rank and rank[dst] > rank[src]

    def _pure(self, form: S.NormForm, t: ir.Tensor) -> bool:
        """Scale and bias are original constants of the match (up to sign; a scale up to a factor).

        Only a preference between nested complete outputs (LN -> Add(beta) -> Add(shift)
        stops at beta); every output chosen is still checked for closure and proved.
        """
        consts = {id(c): c for c in self._cone_consts.get(id(t), ())}  # once each, in order
        found = [k for k in (self._const_key(c) for c in consts.values()) if k is not None]
        keys = {k[0] for k in found}

        def matches(coef: np.ndarray | None, scaled: bool) -> bool:
            if coef is None:
                return True
            if scaled and S.scalar_of(coef) is not None:
                return True
            arr = np.asarray(coef, dtype=np.float64) + 0.0  # -0.0 == 0.0, as == would say
            if (arr.shape, arr.tobytes()) in keys or (arr.shape, (-arr).tobytes()) in keys:
                return True
            if not scaled:
                return False
            for _key, const in found:
                if const.shape != arr.shape:
                    continue
                nz = np.flatnonzero(const)
                if nz.size and np.array_equal(const == 0, arr == 0):
                    k = arr.flat[nz[0]] / const.flat[nz[0]]
                    if np.allclose(arr, k * const, rtol=1e-12, atol=0.0):
                        return True
            return False

        return matches(form.scale, True) and matches(form.bias, False)

    def _const_key(self, t: ir.Tensor) -> tuple[tuple[tuple[int, ...], bytes], np.ndarray] | None:
        """``((shape, float64 bytes), float64 array)`` of a constant, cached; None if not constant."""
        key = id(t)
        if key in self._const_keys:
            return self._const_keys[key]
        if len(self._const_keys) >= CONST_CACHE_LIMIT:
            self._const_keys.clear()
        v = self.mg.const_value(t)
        out = None
        if v is not None:
            arr = np.asarray(v, dtype=np.float64) + 0.0
            out = ((arr.shape, arr.tobytes()), arr)
        self._const_keys[key] = out
        return out

    def _cone(
        self, x: ir.Tensor, t: ir.Tensor, values: dict[int, S.Sym]
    ) -> tuple[list[ir.Node], list[ir.Tensor], str]:
        """Nodes between ``x`` and ``t`` (graph order), the constants they read, or a reason (cached
        for the current walk)."""
        key = (id(x), id(t))
        hit = self._cone_cache.get(key)
        if hit is None:
            hit = self._cone_cache[key] = self._cone_uncached(x, t, values)
        return hit

    def _cone_uncached(
        self, x: ir.Tensor, t: ir.Tensor, values: dict[int, S.Sym]
    ) -> tuple[list[ir.Node], list[ir.Tensor], str]:
        start = t.inputs[0] if t.inputs else None
        if start is None:
            return [], [], "output has no producer"
        alias_ids = self._alias_ids
        seen: set[int] = set()
        stack = [start]
        nodes: list[ir.Node] = []
        consts: list[ir.Tensor] = []
        while stack:
            n = stack.pop()
            nid = id(n)
            if nid in seen:
                continue
            seen.add(nid)
            nodes.append(n)
            shape_args = n.op in _SHAPE_ARG_OPS  # axes / shape inputs are not data
            in_view = bool(n.outputs) and id(n.outputs[0]) in self._layout  # its constants are scalars
            for idx, inp in enumerate(n.inputs):
                tid = id(inp)
                if inp is x or tid in alias_ids:
                    continue
                if tid in values and inp.inputs:
                    stack.append(inp.inputs[0])
                elif not (idx and shape_args) and not (in_view or n.op == "BatchNormalization"):
                    consts.append(inp)
        view = self.mg.view_of(start)
        if view is None:
            return nodes, consts, "node not in any graph"
        if any(n.scope is not view for n in nodes):
            return nodes, consts, "match spans a subgraph boundary"
        nodes.sort(key=lambda n: n.pos)
        return nodes, consts, ""


# op -> evaluator (Walker method): the ops the walk models, each in a few lines.
_EVALUATORS: dict[str, Callable[..., tuple[S.Sym | None, str]]] = {
    "Identity": Walker._ev_identity,
    "Cast": Walker._ev_cast,
    "Neg": Walker._ev_neg,
    "Add": Walker._ev_add_sub,
    "Sub": Walker._ev_add_sub,
    "Mul": Walker._ev_mul,
    "Div": Walker._ev_div,
    "Reciprocal": Walker._ev_reciprocal,
    "Sqrt": Walker._ev_sqrt,
    "Pow": Walker._ev_pow,
    **{op: Walker._ev_reduce for op in REDUCE_OPS},
    "Reshape": Walker._ev_unsqueeze_reshape,
    "Unsqueeze": Walker._ev_unsqueeze_reshape,
    "Squeeze": Walker._ev_squeeze,
    "Max": Walker._ev_max,
    "BatchNormalization": Walker._ev_batch_norm,
}
