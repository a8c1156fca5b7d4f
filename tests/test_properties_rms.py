"""Property-based tests for RMSNorm (``rmsnorm=True``): random chains of RMSNorm variants,
look-alikes and unrelated ops.

A generator of its own (no code shared with ``models/patterns.py`` or ``test_properties.py``)
builds ``x -> block_0 -> block_1 -> ... -> y`` on ``x: [B, S, H]`` (``B`` static or symbolic),
one dtype per chain (fp32 or fp16: a float64 RMSNorm is left alone, as RMSNormalization's
stash_type cannot be float64) and a random default opset (13, 17, 18, 21). Each block is

* a **genuine RMSNorm** ``x / sqrt(mean(x**2) + eps) * gamma``, every knob drawn: the square
  (``Pow(x, 2)`` / ``Mul(x, x)``), the mean (``ReduceMean``, ``ReduceSum * (1/N)``,
  ``ReduceSum / N``), five denominators, the operand order of every commutative op, gamma present or
  absent, shaped like the normalized dims or with leading 1s, on the numerator, axes ``[-1]`` /
  ``[-2, -1]`` / ``[2]`` (positive) / ``[-2]`` (non-trailing), eps log-uniform in ``[1e-12, 1e-2]``,
  constants as Constant nodes or initializers, and for fp16 chains a T5-style fp32 island (gamma
  applied before or after the Cast back);
* a **look-alike**: the same block with exactly one mutation that makes it something other than an
  RMSNorm of its input (eps outside the square root, ``mean(x)**2`` for ``mean(x**2)``, a fourth
  power, a centred numerator, the standard deviation in the denominator, another numerator,
  ``(v + eps) ** -0.25``, gamma varying along a non-normalized axis, an intermediate that is also a
  graph output; or a bare ``ReduceSum`` for the mean, which lnfuse refuses as a likely slip even
  though it is an RMSNorm with ``eps / N`` and scale ``1/sqrt(N)``);
* an **unrelated op**: Relu, Add of a constant, MatMul with a square weight, or a plain
  PyTorch-form LayerNorm (which must become a ``LayerNormalization``, never an RMSNorm).

Properties, with ``lnfuse.optimize(model, rmsnorm=True)``: outputs equal the original's on ONNX
Runtime (CPU, ``ORT_DISABLE_ALL``) within the chain's dtype tolerance; the output passes
``check_model(full_check=True)``; exactly the genuine blocks become ``RMSNormalization`` (plus at
most the affine-free inner norm of a gamma-along-another-axis look-alike) and exactly the
LayerNorm blocks a ``LayerNormalization``; every node of every look-alike is still there; optimizing again changes
nothing. ``LNFUSE_HYPOTHESIS_PROFILE=long`` runs 500 examples per test instead of 25.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from graph_builder import GraphBuilder, run_ort
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lnfuse

pytestmark = pytest.mark.needs_opset(23)  # RMSNormalization

_SETTINGS = settings(
    max_examples=500 if os.environ.get("LNFUSE_HYPOTHESIS_PROFILE") == "long" else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

F16, F32, F64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE
_NP = {F16: np.float16, F32: np.float32, F64: np.float64, TensorProto.INT64: np.int64}
SQUARES = ("pow", "mul")
MEANS = ("mean", "sum_mul", "sum_div")
DENOMS = ("sqrt_div", "sqrt_recip_mul", "pow_neg_half_mul", "div1_sqrt_mul", "pow_half_div")
AXES = {"last": [-1], "last2": [-2, -1], "positive": [2], "mid": [-2]}
MUTATIONS = (
    "eps_outside_sqrt",
    "square_of_mean",
    "fourth_power",
    "centred",
    "std_denominator",
    "other_numerator",
    "quarter_power",
    "gamma_bad_axis",
    "extra_output",
    "sum_not_mean",
)
UNRELATED = ("relu", "add_const", "matmul", "layernorm")


@dataclass(frozen=True)
class RMSBlock:
    """A decomposed RMSNorm (``mutation is None``) or a look-alike (one mutation)."""

    square: str = "pow"
    mean: str = "mean"
    denom: str = "sqrt_div"
    gamma: str = "plain"  # none | plain | lead1 | numerator
    axes: str = "last"
    eps: float = 1e-6
    island: str = ""  # "" | before_cast (gamma in fp32) | after_cast (T5: gamma after the Cast back)
    swaps: tuple[bool, ...] = (False,) * 4
    const_form: str = "init"  # init | node
    mutation: str | None = None


@dataclass(frozen=True)
class Spec:
    dtype: int
    opset: int
    batch: int | str
    seq: int
    hidden: int
    blocks: tuple[RMSBlock | str, ...]  # a str is an unrelated op
    seed: int


@st.composite
def rms_blocks(draw: st.DrawFn, dtype: int, mutation: str | None) -> RMSBlock:
    gamma = draw(st.sampled_from(["none", "plain", "plain", "lead1", "numerator"]))
    axes = draw(st.sampled_from(["last", "last", "last2", "positive", "mid"]))
    if mutation == "gamma_bad_axis":
        gamma, axes = "plain", "last"
    if axes != "last" and gamma == "lead1":
        gamma = "plain"
    denom = draw(st.sampled_from(DENOMS))
    if gamma == "numerator" and denom not in ("sqrt_div", "pow_half_div"):
        gamma = "plain"
    island = draw(st.sampled_from(["", "", "before_cast", "after_cast"])) if dtype == F16 else ""
    eps = float(10 ** draw(st.floats(-12, -2)))  # in fp16 below ~3e-8 it is 0: an RMSNorm with eps 0
    if mutation == "eps_outside_sqrt" and dtype == F16 and not island:
        eps = max(eps, 1e-4)  # an eps that rounds to 0 would make it an RMSNorm after all
    if mutation == "square_of_mean":
        # x / sqrt(mean(x)**2 + eps) divides by |mean| where that is near 0: with a small eps it
        # amplifies the rounding of the blocks before it past any tolerance (seen: 312 on 2.8e3).
        eps = max(eps, 0.1)
    return RMSBlock(
        square=draw(st.sampled_from(SQUARES)),
        mean=draw(st.sampled_from(MEANS)),
        denom=denom,
        gamma=gamma,
        axes=axes,
        eps=eps,
        island=island,
        swaps=tuple(draw(st.lists(st.booleans(), min_size=4, max_size=4))),
        const_form=draw(st.sampled_from(["init", "node"])),
        mutation=mutation,
    )


@st.composite
def specs(draw: st.DrawFn, genuine: float = 0.5, lookalike: float = 0.3, max_blocks: int = 4) -> Spec:
    dtype = draw(st.sampled_from([F32, F16]))  # fp64 RMSNorm is refused: stash_type 11 is not ONNX
    blocks: list[RMSBlock | str] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        u = draw(st.floats(0.0, 1.0))
        if u < genuine:
            blocks.append(draw(rms_blocks(dtype, None)))
        elif u < genuine + lookalike:
            blocks.append(draw(rms_blocks(dtype, draw(st.sampled_from(MUTATIONS)))))
        else:
            blocks.append(draw(st.sampled_from(UNRELATED)))
    return Spec(
        dtype=dtype,
        opset=draw(st.sampled_from([13, 17, 18, 21])),
        batch=draw(st.sampled_from([1, 2, "batch"])),
        seq=draw(st.integers(3, 5)),
        hidden=draw(st.integers(4, 12)),
        blocks=tuple(blocks),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass
class Built:
    model: onnx.ModelProto
    genuine: int = 0
    layernorms: int = 0
    inner_ok: int = 0  # look-alikes holding an exact affine-free RMSNorm that may be fused alone
    lookalike_nodes: dict[int, list[str]] = field(default_factory=dict)
    dtypes: set[int] = field(default_factory=set)


class _Builder(GraphBuilder):
    """Writes one Spec as a model; ``node`` records each node's name (the look-alikes' nodes)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec.seed)
        self.spec = spec
        self.extra: list[onnx.ValueInfoProto] = []
        self.names: list[str] = []

    def node(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.op(op_type, inputs, **attrs)[0]
        self.names.append(self.nodes[-1].name)
        return out

    def value(self, value: Any, dtype: int, form: str) -> str:
        """A constant in the chain's ``dtype``: a Constant node (``form="node"``) or an initializer."""
        arr = np.asarray(value, dtype=_NP[dtype])
        if form == "node":
            return self.node("Constant", [], value=numpy_helper.from_array(arr))
        return self.const(arr, arr.dtype)

    def pair(self, op_type: str, a: str, b: str, swap: bool) -> str:
        return self.node(op_type, [b, a] if swap else [a, b])

    def reduce(self, op_type: str, x: str, axes: list[int], form: str) -> str:
        since = 18 if op_type == "ReduceMean" else 13
        if self.spec.opset < since:
            return self.node(op_type, [x], axes=axes, keepdims=1)
        return self.node(op_type, [x, self.value(axes, TensorProto.INT64, form)], keepdims=1)


def _norm_count(spec: Spec, axes: list[int]) -> int:
    dims = {-1: spec.hidden, 2: spec.hidden, -2: spec.seq}
    return int(np.prod([dims[a] for a in axes]))


def _gamma_shape(spec: Spec, b: RMSBlock) -> list[int]:
    if b.mutation == "gamma_bad_axis":
        return [spec.seq, 1]  # varies along S, normalized over H
    if b.axes in ("last", "positive"):
        return [1, 1, spec.hidden] if b.gamma == "lead1" else [spec.hidden]
    return [spec.seq, spec.hidden] if b.axes == "last2" else [spec.seq, 1]


def _statistic(bd: _Builder, b: RMSBlock, x: str, cdt: int) -> str:
    """``mean(x**2) over the block's axes`` as drawn (or the mutation's statistic)."""
    axes, form, s = AXES[b.axes], b.const_form, b.swaps
    n = _norm_count(bd.spec, axes)
    if b.mutation == "square_of_mean":
        m = bd.reduce("ReduceMean", x, axes, form)
        return bd.node("Mul", [m, m])
    if b.mutation == "std_denominator":
        d = bd.pair("Sub", x, bd.reduce("ReduceMean", x, axes, form), False)
        x = d
    if b.mutation == "fourth_power":
        sq = bd.node("Pow", [x, bd.value(4.0, cdt, form)])
    elif b.square == "pow":
        sq = bd.node("Pow", [x, bd.value(2.0, cdt, form)])
    else:
        sq = bd.node("Mul", [x, x])
    if b.mean == "mean" and b.mutation != "sum_not_mean":
        return bd.reduce("ReduceMean", sq, axes, form)
    total = bd.reduce("ReduceSum", sq, axes, form)
    if b.mutation == "sum_not_mean":
        return total
    if b.mean == "sum_mul":
        return bd.pair("Mul", total, bd.value(1.0 / n, cdt, form), s[0])
    return bd.node("Div", [total, bd.value(float(n), cdt, form)])


def _normalized(bd: _Builder, b: RMSBlock, x: str, ms: str, cdt: int, num: str) -> tuple[str, str]:
    """(x / sqrt(ms + eps) as drawn, the tensor made an extra graph output by that mutation)."""
    form, s = b.const_form, b.swaps
    eps = bd.value(b.eps, cdt, form)
    if b.mutation == "eps_outside_sqrt":
        den = bd.pair("Add", bd.node("Sqrt", [ms]), eps, s[1])
        return bd.node("Div", [num, den]), den
    v = bd.pair("Add", ms, eps, s[1])
    if b.mutation == "quarter_power":
        return bd.pair("Mul", num, bd.node("Pow", [v, bd.value(-0.25, cdt, form)]), s[2]), v
    if b.denom == "sqrt_div":
        return bd.node("Div", [num, bd.node("Sqrt", [v])]), v
    if b.denom == "pow_half_div":
        return bd.node("Div", [num, bd.node("Pow", [v, bd.value(0.5, cdt, form)])]), v
    if b.denom == "sqrt_recip_mul":
        r = bd.node("Reciprocal", [bd.node("Sqrt", [v])])
    elif b.denom == "pow_neg_half_mul":
        r = bd.node("Pow", [v, bd.value(-0.5, cdt, form)])
    else:
        r = bd.node("Div", [bd.value(1.0, cdt, form), bd.node("Sqrt", [v])])
    return bd.pair("Mul", num, r, s[2]), v


def _rms_block(bd: _Builder, b: RMSBlock, x: str, dt: int) -> str:
    cdt = F32 if b.island else dt
    if b.island:
        x = bd.node("Cast", [x], to=F32)
    gdt = dt if b.island == "after_cast" and b.gamma != "numerator" else cdt
    gamma = None
    if b.gamma != "none":
        values = 1.0 + 0.3 * bd.rng.standard_normal(_gamma_shape(bd.spec, b))
        gamma = bd.value(values, gdt, "init" if b.const_form == "init" else "node")
    num = x
    if b.mutation == "centred":
        num = bd.pair("Sub", x, bd.reduce("ReduceMean", x, AXES[b.axes], b.const_form), False)
    elif b.mutation == "other_numerator":
        shift = bd.value(0.1 + 0.2 * bd.rng.standard_normal(bd.spec.hidden), cdt, "init")
        num = bd.pair("Add", x, shift, b.swaps[3])
    if gamma is not None and b.gamma == "numerator":
        num = bd.pair("Mul", num, gamma, b.swaps[3])
    y, inner = _normalized(bd, b, x, _statistic(bd, b, x, cdt), cdt, num)
    if b.mutation == "extra_output":
        bd.extra.append(helper.make_tensor_value_info(inner, cdt, [None, None, None]))
    if gamma is not None and b.gamma != "numerator" and b.island != "after_cast":
        y = bd.pair("Mul", y, gamma, b.swaps[3])
    if b.island:
        y = bd.node("Cast", [y], to=dt)
    if gamma is not None and b.gamma != "numerator" and b.island == "after_cast":
        y = bd.pair("Mul", y, gamma, b.swaps[3])
    return y


def _unrelated(bd: _Builder, kind: str, x: str, dt: int) -> str:
    if kind == "relu":
        return bd.node("Relu", [x])
    if kind == "add_const":
        return bd.node("Add", [x, bd.value(0.1 * bd.rng.standard_normal(bd.spec.hidden), dt, "init")])
    if kind == "layernorm":
        d = bd.node("Sub", [x, bd.reduce("ReduceMean", x, [-1], "init")])
        sq = bd.node("Pow", [d, bd.value(2.0, dt, "init")])
        v = bd.node("Add", [bd.reduce("ReduceMean", sq, [-1], "init"), bd.value(1e-5, dt, "init")])
        n = bd.node("Div", [d, bd.node("Sqrt", [v])])
        g = bd.value(1.0 + 0.2 * bd.rng.standard_normal(bd.spec.hidden), dt, "init")
        return bd.node(
            "Add",
            [bd.node("Mul", [n, g]), bd.value(0.1 * bd.rng.standard_normal(bd.spec.hidden), dt, "init")],
        )
    w = np.eye(bd.spec.hidden) + 0.1 * bd.rng.standard_normal((bd.spec.hidden, bd.spec.hidden))
    return bd.node("MatMul", [x, bd.value(w, dt, "init")])


def build(spec: Spec) -> Built:
    bd = _Builder(spec)
    dt, cur = spec.dtype, "x"
    built = Built(onnx.ModelProto(), dtypes={dt})
    for i, b in enumerate(spec.blocks):
        start = len(bd.names)
        if isinstance(b, str):
            cur = _unrelated(bd, b, cur, dt)
            built.layernorms += b == "layernorm"
            continue
        cur = _rms_block(bd, b, cur, dt)
        if b.island:
            built.dtypes.add(F32)
        if b.mutation is None:
            built.genuine += 1
        else:
            # A gamma along another axis leaves an exact affine-free RMSNorm, which may fuse alone.
            built.inner_ok += b.mutation == "gamma_bad_axis"
            names = bd.names[start:]
            if b.mutation == "gamma_bad_axis":
                names = [n for n in names if n.endswith("_Mul")][-1:]  # the Mul by that gamma stays
            built.lookalike_nodes[i] = names
    shape = [spec.batch, spec.seq, spec.hidden]
    graph = helper.make_graph(
        bd.nodes,
        "rms_chain",
        [helper.make_tensor_value_info("x", dt, shape)],
        [helper.make_tensor_value_info(cur, dt, shape), *bd.extra],
        bd.inits,
    )
    built.model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=8 if spec.opset <= 17 else 10
    )
    return built


def _tolerance(built: Built) -> float:
    """Relative to ``max(1, max|reference|)``: fp16 3e-2 (every op rounds to fp16 in the original),
    fp32 1e-4, fp64 1e-8 (the fused op's epsilon attribute is a float32)."""
    if F16 in built.dtypes:
        return 3e-2
    return 1e-4 if F32 in built.dtypes else 1e-8


def _mismatch(ref: list[np.ndarray], got: list[np.ndarray], rtol: float) -> str:
    """'' when every output agrees (non-finite where the original is; within ``rtol`` elsewhere)."""
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.shape != b.shape:
            return f"output {k}: shape {b.shape} != {a.shape}"
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fin = np.isfinite(a64)
        if np.any(fin & ~np.isfinite(b64)):
            return f"output {k}: optimized is not finite where the original is"
        if np.any(fin):
            err = float(np.max(np.abs(a64[fin] - b64[fin])))
            scale = max(1.0, float(np.max(np.abs(a64[fin]))))
            if err > rtol * scale:
                return f"output {k}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"
    return ""


def check_properties(spec: Spec) -> None:
    built = build(spec)
    if currently_in_test_context():
        note(repr(spec))
    onnx.checker.check_model(built.model, full_check=True)
    result = lnfuse.optimize(built.model, rmsnorm=True)
    out, explain = result.model, result.report.render_text(explain=True)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("LayerNormalization") == built.layernorms, explain
    n_rms = ops.count("RMSNormalization")
    assert built.genuine <= n_rms <= built.genuine + built.inner_ok, (
        f"{n_rms} fused, {built.genuine} genuine\n{explain}"
    )
    names = {n.name for n in out.graph.node}
    for i, nodes in built.lookalike_nodes.items():
        gone = [n for n in nodes if n not in names]
        assert not gone, f"look-alike b{i} ({spec.blocks[i]}) lost {gone}\n{explain}"
    batch = spec.batch if isinstance(spec.batch, int) else 2
    x = np.random.default_rng(spec.seed ^ 0x5EED).standard_normal((batch, spec.seq, spec.hidden)) + 0.5
    feed = {"x": x.astype(_NP[spec.dtype])}
    problem = _mismatch(run_ort(built.model, feed), run_ort(out, feed), _tolerance(built))
    assert not problem, f"{problem}\n{explain}"
    assert lnfuse.optimize(out, rmsnorm=True).changed is False


@_SETTINGS
@given(specs())
def test_mixed_rms_chains(spec: Spec) -> None:
    """RMSNorms, look-alikes, LayerNorms and unrelated ops, mixed."""
    check_properties(spec)


@_SETTINGS
@given(specs(genuine=0.8, lookalike=0.0, max_blocks=3))
def test_genuine_rms_chains(spec: Spec) -> None:
    """Only genuine RMSNorms (and unrelated ops): every one must be fused."""
    check_properties(spec)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_rms_mutation_is_refused(mutation: str) -> None:
    """One deterministic look-alike per mutation, in fp32 and fp16."""
    for dtype in (F32, F16):
        check_properties(Spec(dtype, 18, 2, 3, 8, (RMSBlock(mutation=mutation), "relu"), seed=7))


@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("denom", DENOMS)
def test_each_genuine_rms_form_is_fused(mean: str, denom: str) -> None:
    for opset, island in ((13, ""), (18, "after_cast")):
        block = RMSBlock(mean=mean, denom=denom, island=island)
        spec = Spec(F16 if island else F32, opset, "batch", 4, 6, (block, "matmul", block), seed=3)
        check_properties(spec)
        assert build(spec).genuine == 2
