"""Property-based tests: random chains of LayerNorm variants, look-alikes and unrelated ops.

An independent graph generator (it shares no code with ``models/patterns.py``, so it finds
different bugs) builds a model ``x -> block_0 -> block_1 -> ... -> y`` on ``x: [B, S, H]``
(``B`` static or symbolic, ``S``/``H`` static), one dtype per chain (fp32, fp64 or fp16) and a
random default opset (11, 13, 14, 17, 18). Each block is one of:

* a **genuine LayerNorm**, every knob drawn: plain or Keras form (``x*s + (beta - mean*s)``),
  square ``Pow(d, 2)`` / ``Mul(d, d)``, two-pass / one-pass / unbiased variance
  (``ReduceSum / (N-1)`` or ``ReduceMean * N/(N-1)``), the mean computed once or twice, five
  denominators (Sqrt+Div, Sqrt+Reciprocal+Mul, Div(1, Sqrt)+Mul, Pow(-0.5)+Mul, Pow(0.5)+Div),
  the operand order of every commutative Add/Mul, gamma / beta present or absent, shaped like the
  normalized dims or with leading 1s, gamma on the numerator, axes ``[-1]`` / ``[-2, -1]`` /
  ``[-2]`` (non-trailing), written negative or positive, keepdims explicit or default, eps
  log-uniform in ``[1e-12, 1e-2]`` stored in the block's dtype, constants as Constant nodes or
  initializers, gamma/beta as initializer / Constant / Identity, optionally a Cast island (the LN
  computed in fp32 for an fp16 chain, fp64 for fp32, fp32 for fp64; gamma/beta inside the island
  or applied after the Cast back);
* a **look-alike**: the same builder with exactly one mutation that breaks exactness (reversed
  Sub, ``Pow(d, 3)`` / ``Pow(d, 4)``, eps outside the Sqrt, ReduceSum for the mean, variance of x,
  variance over other axes, gamma varying along a non-normalized axis, ``keepdims=0`` on a shape
  where the broadcast still runs, an intermediate that is also a graph output);
* an **unrelated op**: Relu (plus a small offset, so that no row of it is constant), Add of a
  constant, MatMul with a square weight, Transpose-Transpose.

Properties checked for every generated model (``lnfuse.optimize`` with default options):

1. outputs equal the original's on ONNX Runtime (CPU, ``ORT_DISABLE_ALL``) for a seeded
   mean-offset normal input, within the tolerance of the least precise dtype the chain computes
   in (see :func:`_tolerance`); the original may be NaN / inf where the optimized is finite only
   in fp16 (overflow) or when a one-pass variance is in the chain (its ``E[x^2] - E[x]^2`` of a
   constant row can round below ``-eps``: a Relu before it makes such rows);
2. the optimized model passes ``onnx.checker.check_model(full_check=True)``;
3. every genuine LN is fused: the output has exactly as many ``LayerNormalization`` nodes as
   genuine blocks were generated (plus at most one per "gamma along a non-normalized axis"
   look-alike whose ``(x - mean) / std`` is computed on its own: an exact affine-free LayerNorm);
4. no look-alike is fused: every node of every look-alike block is still in the output, by name
   (except the leading Cast of a Cast island, which the LN before it may take as its output Cast;
   for the gamma look-alike above, its Mul by that gamma; and a look-alike's leading
   ``x - mean(x)`` when x is an LN's output shifted by a scalar: that is the LN itself, and the
   LN's match may end there);
5. optimizing the output again changes nothing (``changed is False``).

Profiles: ``ci`` (default, 25 examples per test, no deadline) and ``long`` (500 examples).
Select with the environment variable ``LNFUSE_HYPOTHESIS_PROFILE``::

    LNFUSE_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lnfuse

# --------------------------------------------------------------------------------------------------
# profiles

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_HEALTH)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=_HEALTH)
PROFILE = os.environ.get("LNFUSE_HYPOTHESIS_PROFILE", "ci")
_SETTINGS = settings.get_profile(PROFILE)

# --------------------------------------------------------------------------------------------------
# the specification of a random model (plain data, so a failing example prints readably)

F16, F32, F64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE
_NP = {F16: np.float16, F32: np.float32, F64: np.float64}
_NAME = {F16: "fp16", F32: "fp32", F64: "fp64"}
_ISLAND = {F16: F32, F32: F64, F64: F32}

DENOMS = ("sqrt_div", "sqrt_recip_mul", "sqrt_div1_mul", "pow_neg_half_mul", "pow_half_div")
VARIANCES = ("two_pass", "one_pass_mul", "one_pass_pow", "unbiased_sum", "unbiased_mul")
MUTATIONS = (
    "sub_reversed",
    "pow_odd",
    "eps_outside_sqrt",
    "reducesum_mean",
    "var_of_x",
    "axes_mismatch",
    "gamma_bad_axis",
    "keepdims0",
    "extra_output",
)
UNRELATED = ("relu", "add_const", "matmul", "transpose2")


@dataclass(frozen=True)
class LNBlock:
    """A decomposed LayerNorm (``mutation is None``) or a look-alike (one mutation)."""

    style: str = "plain"  # plain | keras
    square: str = "pow"  # pow | mul
    variance: str = "two_pass"
    mean_twice: bool = False
    denom: str = "sqrt_div"
    gamma: bool = True
    beta: bool = True
    gamma_lead1: bool = False  # gamma shaped [1, 1, ...] instead of the normalized dims
    beta_lead1: bool = False
    gamma_on_num: bool = False
    axes: str = "last"  # last [-1] | last2 [-2, -1] | mid [-2]
    positive_axes: bool = False
    keepdims_explicit: bool = False
    eps: float = 1e-5
    island: bool = False
    affine_after_cast: bool = False
    swaps: tuple[bool, ...] = ()  # operand order of each commutative op, in build order
    const_form: str = "node"  # node | init
    param_form: str = "init"  # init | constant | identity
    mutation: str | None = None
    detail: str = ""  # mutation parameter (exponent, which intermediate, ...)


@dataclass(frozen=True)
class OtherBlock:
    kind: str  # relu | add_const | matmul | transpose2
    swap: bool = False
    detail: str = ""


@dataclass(frozen=True)
class ChainSpec:
    dtype: int
    opset: int
    batch: int | str  # static size or the symbolic name "batch"
    seq: int
    hidden: int
    blocks: tuple[LNBlock | OtherBlock, ...]
    seed: int

    def describe(self) -> str:
        lines = [
            f"{_NAME[self.dtype]} opset {self.opset} x[{self.batch}, {self.seq}, {self.hidden}] seed {self.seed}"
        ]
        for i, b in enumerate(self.blocks):
            lines.append(f"  b{i}: {b}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# strategies


@st.composite
def ln_blocks(
    draw: st.DrawFn, dtype: int, batch: int | str, seq: int, hidden: int, mutation: str | None
) -> LNBlock:
    """A genuine LN (``mutation=None``) or a look-alike with that mutation, fitted to the shape."""
    style = draw(st.sampled_from(["plain", "plain", "keras"]))
    island = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else False
    cdt = _ISLAND[dtype] if island else dtype
    variance = draw(st.sampled_from(VARIANCES))
    if style == "keras":
        variance = "two_pass"
    if variance == "unbiased_mul" and cdt == F16:
        variance = "unbiased_sum"  # N/(N-1) is not exact in fp16: a scaled variance, refused by policy
    b = LNBlock(
        style=style,
        square=draw(st.sampled_from(["pow", "mul"])),
        variance=variance,
        mean_twice=style == "plain" and not variance.startswith("one_pass") and draw(st.booleans()),
        denom=draw(st.sampled_from(DENOMS)),
        gamma=draw(st.booleans()),
        beta=draw(st.booleans()),
        gamma_lead1=draw(st.booleans()),
        beta_lead1=draw(st.booleans()),
        gamma_on_num=style == "plain" and draw(st.booleans()),
        axes=draw(st.sampled_from(["last", "last", "last2", "mid"])),
        positive_axes=draw(st.booleans()),
        keepdims_explicit=draw(st.booleans()),
        eps=draw(st.floats(-12.0, -2.0).map(lambda e: 10.0**e)),
        island=island,
        affine_after_cast=island and draw(st.booleans()),
        swaps=tuple(draw(st.lists(st.booleans(), min_size=12, max_size=12))),
        const_form=draw(st.sampled_from(["node", "init"])),
        param_form=draw(st.sampled_from(["init", "constant", "identity"])),
    )
    if mutation is None:
        return b
    # Fit the look-alike to the shape so that it is not accidentally a LayerNorm.
    detail = ""
    if mutation == "sub_reversed":
        b = replace(b, style="plain")
    elif mutation == "pow_odd":
        detail = draw(st.sampled_from(["3", "4"]))
        b = replace(b, variance="two_pass", square="pow")
    elif mutation == "eps_outside_sqrt":
        # eps must survive in the block's dtype (fp16 flushes < 6e-8 to 0: sqrt(var) + 0 is a LayerNorm)
        b = replace(
            b,
            denom=draw(st.sampled_from(["sqrt_div", "sqrt_recip_mul", "sqrt_div1_mul"])),
            eps=max(b.eps, 1e-4),
        )
    elif mutation == "var_of_x":
        # (mean computed once: the centred x - mean must still feed the numerator)
        b = replace(b, variance=draw(st.sampled_from(["two_pass", "one_pass_mul"])), mean_twice=False)
    elif mutation == "axes_mismatch":
        b = replace(b, variance="two_pass")
        detail = {"last": "last2", "last2": "last", "mid": "last"}[b.axes]
    elif mutation == "gamma_bad_axis":
        b = replace(b, gamma=True, gamma_on_num=False, axes=draw(st.sampled_from(["last", "mid"])))
    elif mutation == "keepdims0":
        # mean [B, S] broadcasts against [B, S, H] only for B == 1 and S == H (checked by the caller).
        b = replace(b, style="plain", axes="last", variance="two_pass", mean_twice=False)
    elif mutation == "extra_output":
        choices = ["mean", "d", "var", "sq"] if b.style == "plain" else ["mean", "d", "var", "r"]
        if b.variance.startswith("one_pass"):
            choices.remove("sq")
        detail = draw(st.sampled_from(choices))
    return replace(b, mutation=mutation, detail=detail)


@st.composite
def other_blocks(draw: st.DrawFn) -> OtherBlock:
    kind = draw(st.sampled_from(UNRELATED))
    detail = draw(st.sampled_from(["[0, 2, 1]", "[1, 0, 2]"])) if kind == "transpose2" else ""
    if kind == "add_const":
        detail = draw(st.sampled_from(["vector", "scalar"]))
    return OtherBlock(kind=kind, swap=draw(st.booleans()), detail=detail)


@st.composite
def chains(draw: st.DrawFn, genuine: float = 0.5, lookalike: float = 0.25, max_blocks: int = 5) -> ChainSpec:
    dtype = draw(st.sampled_from([F32, F32, F64, F16]))
    opset = draw(st.sampled_from([11, 13, 14, 17, 18]))
    if draw(st.integers(0, 4)) == 0:  # square rows: keepdims=0 look-alikes can run
        batch: int | str = 1
        seq = hidden = draw(st.integers(4, 5))
    else:
        batch = draw(st.sampled_from([1, 2, "batch"]))
        seq = draw(st.integers(3, 5))
        hidden = draw(st.integers(4, 12))
    n = draw(st.integers(1, max_blocks))
    blocks: list[LNBlock | OtherBlock] = []
    for _ in range(n):
        u = draw(st.floats(0.0, 1.0))
        if u < genuine:
            blocks.append(draw(ln_blocks(dtype, batch, seq, hidden, None)))
        elif u < genuine + lookalike:
            muts = list(MUTATIONS)
            if not (batch == 1 and seq == hidden):
                muts.remove("keepdims0")
            blocks.append(draw(ln_blocks(dtype, batch, seq, hidden, draw(st.sampled_from(muts)))))
        else:
            blocks.append(draw(other_blocks()))
    return ChainSpec(dtype, opset, batch, seq, hidden, tuple(blocks), draw(st.integers(0, 2**31 - 1)))


# --------------------------------------------------------------------------------------------------
# the builder


@dataclass
class Built:
    model: onnx.ModelProto
    genuine: int
    inner_ok: int  # look-alikes holding an exact affine-free LN that may be fused on its own
    lookalike_nodes: dict[int, list[str]] = field(default_factory=dict)
    dtypes: set[int] = field(default_factory=set)  # every dtype a block computes in
    one_pass: bool = False


class _Builder:
    def __init__(self, spec: ChainSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_outputs: list[onnx.ValueInfoProto] = []
        self.block = 0
        self.block_nodes: dict[int, list[str]] = {}
        self.count = 0
        self.exempt: set[str] = set()
        self.gamma_mul: dict[int, str] = {}

    # -- primitives ---------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self.count += 1
        name = f"/b{self.block}/{op_type}_{self.count}"
        out = f"{name}:0"
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        self.block_nodes.setdefault(self.block, []).append(name)
        return out

    def const(self, value: Any, np_dtype: Any, form: str) -> str:
        arr = np.asarray(value, dtype=np_dtype)
        if form == "node":
            return self.op("Constant", [], value=numpy_helper.from_array(arr))
        self.count += 1
        name = f"b{self.block}.c{self.count}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def param(self, arr: np.ndarray, form: str) -> str:
        if form == "constant":
            return self.const(arr, arr.dtype, "node")
        self.count += 1
        name = f"b{self.block}.param{self.count}"
        self.inits.append(numpy_helper.from_array(arr, name))
        if form == "identity":
            return self.op("Identity", [name])
        return name

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int | None, form: str) -> str:
        opset = self.spec.opset
        if (op_type == "ReduceSum" and opset >= 13) or opset >= 18:
            return self.op(op_type, [x, self.const(axes, np.int64, form)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    # -- blocks -------------------------------------------------------------------
    def other(self, x: str, b: OtherBlock, dt: int) -> str:
        npd = _NP[dt]
        H = self.spec.hidden
        if b.kind == "relu":
            # Plus a small offset that varies along S and H: a row of x all below 0 would come out
            # exactly constant, and a norm of it divides rounding noise by sqrt(eps).
            ramp = self.const(0.05 * self.rng.standard_normal((self.spec.seq, H)), npd, "init")
            return self.op("Add", [self.op("Relu", [x]), ramp])
        if b.kind == "add_const":
            shape = (H,) if b.detail == "vector" else ()
            c = self.const(0.3 * self.rng.standard_normal(shape), npd, "init")
            return self.op("Add", [c, x] if b.swap else [x, c])
        if b.kind == "matmul":
            w = self.const(self.rng.standard_normal((H, H)) / math.sqrt(H), npd, "init")
            return self.op("MatMul", [x, w])
        perm = [0, 2, 1] if b.detail == "[0, 2, 1]" else [1, 0, 2]
        return self.op("Transpose", [self.op("Transpose", [x], perm=perm)], perm=perm)

    def ln(self, x: str, b: LNBlock, dt: int) -> tuple[str, int]:
        """Append the block; returns (output, dtype the statistics are computed in)."""
        spec = self.spec
        B = spec.batch if isinstance(spec.batch, int) else 1
        S, H = spec.seq, spec.hidden
        cdt = _ISLAND[dt] if b.island else dt
        npd = _NP[cdt]
        swaps: Iterator[bool] = iter(b.swaps)
        mut = b.mutation

        def sw() -> bool:
            return next(swaps, False)

        def add(a: str, c: str) -> str:
            return self.op("Add", [c, a] if sw() else [a, c])

        def mul(a: str, c: str) -> str:
            return self.op("Mul", [c, a] if sw() else [a, c])

        def scalar(v: float) -> str:
            return self.const(v, npd, b.const_form)

        axes_neg = {"last": [-1], "last2": [-2, -1], "mid": [-2]}[b.axes]

        def axes_of(neg: list[int]) -> list[int]:
            return [a + 3 for a in neg] if b.positive_axes else list(neg)

        axes = axes_of(axes_neg)
        n_norm = math.prod({-1: H, -2: S}[a] for a in axes_neg)
        keep = 1 if b.keepdims_explicit else None

        # Parameters in the dtype they are applied in, shaped on the normalized dims.
        pdt = dt if b.affine_after_cast else cdt
        norm_shape = {"last": (H,), "last2": (S, H), "mid": (S, 1)}[b.axes]

        def pshape(lead1: bool) -> tuple[int, ...]:
            return (1,) * (3 - len(norm_shape)) + norm_shape if lead1 else norm_shape

        g_shape = pshape(b.gamma_lead1)
        if mut == "gamma_bad_axis":
            g_shape = (S, 1) if b.axes == "last" else (H,)
        gamma = (1.0 + 0.3 * self.rng.standard_normal(g_shape)).astype(_NP[pdt])
        beta = (0.2 * self.rng.standard_normal(pshape(b.beta_lead1))).astype(_NP[pdt])
        del B

        xin = self.op("Cast", [x], to=cdt) if b.island else x
        if b.island:
            # A preceding LN may legitimately take this Cast as its own output Cast.
            self.exempt.add(self.nodes[-1].name)
        names: dict[str, str] = {}
        mean_op = "ReduceSum" if mut == "reducesum_mean" else "ReduceMean"
        mean = self.reduce(mean_op, xin, axes, 0 if mut == "keepdims0" else keep, b.const_form)
        names["mean"] = mean
        rev = mut == "sub_reversed"

        def centred() -> str:
            # x - mean, built on first use only (a form that never reads it must not leave a dead node)
            if "d" not in names:
                names["d"] = self.op("Sub", [mean, xin] if rev and not b.mean_twice else [xin, mean])
            return names["d"]

        def square(t: str) -> str:
            if mut == "pow_odd":
                return self.op("Pow", [t, scalar(float(b.detail))])
            if b.square == "mul":
                return self.op("Mul", [t, t])
            return self.op("Pow", [t, scalar(2.0)])

        v_axes = axes
        if mut == "axes_mismatch":
            v_axes = axes_of({"last": [-1], "last2": [-2, -1]}[b.detail])
        base = xin if mut == "var_of_x" else None
        if b.variance == "two_pass":
            sq = square(base or centred())
            names["sq"] = sq
            var = self.reduce("ReduceMean", sq, v_axes, keep, b.const_form)
        elif b.variance in ("one_pass_mul", "one_pass_pow"):
            if b.variance == "one_pass_mul":
                m2 = self.reduce("ReduceMean", self.op("Mul", [xin, xin]), v_axes, keep, b.const_form)
            else:
                m2 = self.reduce("ReduceMean", self.op("Pow", [xin, scalar(2.0)]), v_axes, keep, b.const_form)
            if mut == "var_of_x":
                var = m2  # no "- mean**2"
            else:
                msq = (
                    self.op("Mul", [mean, mean])
                    if b.variance == "one_pass_mul"
                    else self.op("Pow", [mean, scalar(2.0)])
                )
                var = self.op("Sub", [m2, msq])
        elif b.variance == "unbiased_sum":
            sq = square(base or centred())
            names["sq"] = sq
            s = self.reduce("ReduceSum", sq, v_axes, keep, b.const_form)
            var = self.op("Div", [s, scalar(n_norm - 1)])
        else:  # unbiased_mul
            sq = square(base or centred())
            names["sq"] = sq
            var = mul(
                self.reduce("ReduceMean", sq, v_axes, keep, b.const_form), scalar(n_norm / (n_norm - 1))
            )
        names["var"] = var

        if b.mean_twice:
            mean2 = self.reduce(mean_op, xin, axes, keep, b.const_form)
            num = self.op("Sub", [mean2, xin] if rev else [xin, mean2])
        elif b.style == "plain":
            num = centred()

        g_name = self.param(gamma, b.param_form) if b.gamma and not b.affine_after_cast else None
        b_name = self.param(beta, b.param_form) if b.beta and not b.affine_after_cast else None

        # Denominator: r = 1 / sqrt(var + eps) (Keras needs r) or std = sqrt(var + eps).
        if mut == "eps_outside_sqrt":
            std = add(self.op("Sqrt", [var]), scalar(b.eps))
        else:
            ve = add(var, scalar(b.eps))
            std = None
        if b.style == "keras":
            if std is None:
                if b.denom == "pow_neg_half_mul":
                    r = self.op("Pow", [ve, scalar(-0.5)])
                elif b.denom == "sqrt_div1_mul":
                    r = self.op("Div", [scalar(1.0), self.op("Sqrt", [ve])])
                elif b.denom == "pow_half_div":
                    r = self.op("Reciprocal", [self.op("Pow", [ve, scalar(0.5)])])
                else:
                    r = self.op("Reciprocal", [self.op("Sqrt", [ve])])
            else:
                r = self.op("Reciprocal", [std])
            names["r"] = r
            s = mul(r, g_name) if g_name else r
            xs = mul(xin, s)
            ms = mul(mean, s)
            y = add(xs, self.op("Sub", [b_name, ms])) if b_name else self.op("Sub", [xs, ms])
        else:
            if g_name and b.gamma_on_num:
                num = mul(num, g_name)
            if std is not None:
                y = self.op("Div", [num, std]) if b.denom == "sqrt_div" else None
                if y is None:
                    r = (
                        self.op("Reciprocal", [std])
                        if b.denom == "sqrt_recip_mul"
                        else self.op("Div", [scalar(1.0), std])
                    )
                    y = mul(num, r)
            elif b.denom == "sqrt_div":
                y = self.op("Div", [num, self.op("Sqrt", [ve])])
            elif b.denom == "sqrt_recip_mul":
                y = mul(num, self.op("Reciprocal", [self.op("Sqrt", [ve])]))
            elif b.denom == "sqrt_div1_mul":
                y = mul(num, self.op("Div", [scalar(1.0), self.op("Sqrt", [ve])]))
            elif b.denom == "pow_neg_half_mul":
                y = mul(num, self.op("Pow", [ve, scalar(-0.5)]))
            else:
                y = self.op("Div", [num, self.op("Pow", [ve, scalar(0.5)])])
            if g_name and not b.gamma_on_num:
                y = mul(y, g_name)
                self.gamma_mul[self.block] = self.nodes[-1].name
            if b_name:
                y = add(y, b_name)

        if b.island:
            y = self.op("Cast", [y], to=dt)
            if b.affine_after_cast:
                if b.gamma:
                    y = mul(y, self.param(gamma, b.param_form))
                    self.gamma_mul[self.block] = self.nodes[-1].name
                if b.beta:
                    y = add(y, self.param(beta, b.param_form))

        if mut == "extra_output":
            t = centred() if b.detail == "d" else names[b.detail]
            rank = 2 if (b.detail == "mean" and mut == "keepdims0") else 3
            self.extra_outputs.append(helper.make_tensor_value_info(t, cdt, [None] * rank))
        return y, cdt

    @staticmethod
    def double_stats(b: LNBlock, dt: int) -> bool:
        """The block computes its statistics in float64 (what lnfuse leaves unfused)."""
        return (_ISLAND[dt] if b.island else dt) == F64

    def build(self) -> Built:
        spec = self.spec
        dt = spec.dtype
        cur = "x"
        genuine = extra = 0
        lookalike: dict[int, list[str]] = {}
        dtypes = {dt}
        one_pass = False
        for i, b in enumerate(spec.blocks):
            self.block = i
            if isinstance(b, OtherBlock):
                cur = self.other(cur, b, dt)
                prev = spec.blocks[i - 1] if i else None
                if (
                    b.kind == "add_const"
                    and isinstance(prev, LNBlock)
                    and prev.mutation is None
                    and not prev.beta
                    and not self.double_stats(prev, dt)
                ):
                    # Policy: an Add right after a beta-less LN is taken as its beta; when that
                    # constant varies along a non-normalized axis the whole match is refused (as a
                    # "beta broadcasting over a non-normalized axis" look-alike), so that LN may stay.
                    genuine -= 1
                    extra += 1
                continue
            cur, cdt = self.ln(cur, b, dt)
            dtypes.add(cdt)
            one_pass = one_pass or b.variance.startswith("one_pass")
            if b.mutation is None and self.double_stats(b, dt):
                pass  # float64 statistics: the standard op has no fp64 stash_type, left unfused (#11)
            elif b.mutation is None:
                genuine += 1
            elif b.mutation == "gamma_bad_axis" and (b.style == "plain" or b.affine_after_cast):
                # (x - mean) / std alone is an affine-free LayerNorm: fusing it is correct, the
                # Mul by the gamma that varies along a non-normalized axis must stay.
                extra += 1
                lookalike[i] = [self.gamma_mul[i]]
            else:
                lookalike[i] = [n for n in self.block_nodes[i] if n not in self.exempt]
        shape = [spec.batch, spec.seq, spec.hidden]
        graph = helper.make_graph(
            self.nodes,
            "chain",
            [helper.make_tensor_value_info("x", dt, shape)],
            [helper.make_tensor_value_info(cur, dt, shape), *self.extra_outputs],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", spec.opset)],
            ir_version=8 if spec.opset <= 17 else 10,
            producer_name="lnfuse.tests.properties",
        )
        return Built(model, genuine, extra, lookalike, dtypes, one_pass)


def build(spec: ChainSpec) -> Built:
    return _Builder(spec).build()


# --------------------------------------------------------------------------------------------------
# checks


def _tolerance(built: Built) -> float:
    """Relative tolerance (against ``max(1, max|reference|)``) for the least precise dtype computed in.

    * fp64 ``1e-8``: fused and decomposed fp64 differ by a few ulps (~1e-16) per op, but the ONNX
      ``epsilon`` attribute is a float32, so an fp64 eps is rounded by up to 2**-24 of itself
      (eps <= 1e-2: ~6e-10 absolute on the variance, ~3e-9 relative on the output for var ~ 0.1);
    * fp32 ``1e-4`` (``1e-3`` when a one-pass variance is in the chain: mean(x^2) - mean^2 cancels
      about log10(mean^2/var) digits): fp32 ulp ~6e-8, a chain of <= 5 blocks amplifies it by the
      1/std of each LN and by MatMul;
    * fp16 ``3e-2``: fp16 ulp ~1e-3; the decomposed fp16 chain rounds every op to fp16 while the
      fused op keeps fp32 statistics, a few ulps per op, plus the fp16 cast of the result.
    """
    if F16 in built.dtypes:
        return 3e-2
    if F32 in built.dtypes:
        return 1e-3 if built.one_pass or _ORT_CANCELS else 1e-4
    return 1e-8


# Older ONNX Runtime (seen on the 1.21 floor, not on 1.31) computes LayerNormalization's variance
# with the cancellation of a one-pass E[x^2] - E[x]^2 on rows whose mean is large against their
# spread: the fused op is then held to the one-pass tolerance (seen: 1.8e-4 on a chain whose first
# block is a ReduceSum look-alike, so the second LN's rows sit far from zero).
_ORT_CANCELS = tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 31)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feed(spec: ChainSpec) -> dict[str, np.ndarray]:
    B = spec.batch if isinstance(spec.batch, int) else 2
    rng = np.random.default_rng(spec.seed ^ 0x5EED)
    x = rng.standard_normal((B, spec.seq, spec.hidden)) + 0.5
    return {"x": x.astype(_NP[spec.dtype])}


def _compare(ref: list[np.ndarray], got: list[np.ndarray], rtol: float, original_may_fail: bool) -> str:
    """'' when equal within tolerance; NaN must match NaN, except that with ``original_may_fail``
    the original may be the non-finite one (an fp16 overflow, a one-pass variance below -eps)."""
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.shape != b.shape:
            return f"output {k}: shape {b.shape} != {a.shape}"
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fa, fb = np.isfinite(a64), np.isfinite(b64)
        if np.any(fa & ~fb):
            return f"output {k}: optimized is not finite where the original is"
        if np.any(~fa & fb) and not original_may_fail:
            return (
                f"output {k}: original is not finite where the optimized is ({int(np.sum(~fa & fb))} values)"
            )
        both = fa & fb
        if not np.any(both):
            continue
        err = float(np.max(np.abs(a64[both] - b64[both])))
        scale = max(1.0, float(np.max(np.abs(a64[both]))))
        if err > rtol * scale:
            return f"output {k}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"
    return ""


def _note(text: str) -> None:
    if currently_in_test_context():  # the deterministic tests below call check_properties directly
        note(text)


def _centring_absorbed(built: Built, result: lnfuse.OptimizeResult, node: str) -> bool:
    """A look-alike that starts ``x - mean(x)`` on the output of an LN (shifted by a scalar, say)
    computes that LN there exactly: its leading ReduceMean and Sub may end the LN's match."""
    by_name = {n.name: n for n in built.model.graph.node}
    n = by_name.get(node)
    if n is None or n.op_type not in ("ReduceMean", "Sub"):
        return False
    sub = (
        n
        if n.op_type == "Sub"
        else next((m for m in built.model.graph.node if n.output[0] in m.input and m.op_type == "Sub"), None)
    )
    return sub is not None and any(m.output == sub.output[0] for m in result.report.matches)


def check_properties(spec: ChainSpec) -> None:
    built = build(spec)
    _note(spec.describe())
    onnx.checker.check_model(built.model, full_check=True)

    result = lnfuse.optimize(built.model)
    out = result.model
    explain = result.report.render_text(explain=True)
    _note(explain)

    # 2. the output is valid ONNX
    onnx.checker.check_model(out, full_check=True)

    # 3. every genuine LN fused (and nothing else fused into a LayerNormalization)
    n_ln = sum(1 for n in out.graph.node if n.op_type == "LayerNormalization")
    assert built.genuine <= n_ln <= built.genuine + built.inner_ok, (
        f"{n_ln} LayerNormalization in the output, {built.genuine} genuine LNs generated"
        + (f" (+ up to {built.inner_ok} inner affine-free LNs)" if built.inner_ok else "")
        + f"\n{explain}"
    )

    # 4. every look-alike left alone, node for node (its distinctive node where an inner LN may fuse)
    names = {n.name for n in out.graph.node}
    for i, nodes in built.lookalike_nodes.items():
        gone = [n for n in nodes if n not in names and not _centring_absorbed(built, result, n)]
        assert not gone, f"look-alike block b{i} ({spec.blocks[i]}) lost nodes {gone}\n{explain}"

    # 1. numerics at ORT_DISABLE_ALL
    feed = _feed(spec)
    ref = _session(built.model).run(None, feed)
    got = _session(out).run(None, feed)
    problem = _compare(ref, got, _tolerance(built), F16 in built.dtypes or built.one_pass)
    assert not problem, f"{problem}\n{explain}"

    # 5. idempotent
    again = lnfuse.optimize(out)
    assert again.changed is False, (
        f"second optimize changed the model:\n{again.report.render_text(explain=True)}"
    )


# --------------------------------------------------------------------------------------------------
# the tests


@_SETTINGS
@given(chains())
def test_mixed_chains(spec: ChainSpec) -> None:
    """Genuine LNs, look-alikes and unrelated ops, mixed."""
    check_properties(spec)


@_SETTINGS
@given(chains(genuine=0.75, lookalike=0.0, max_blocks=4))
def test_genuine_chains(spec: ChainSpec) -> None:
    """Only genuine LNs and unrelated ops: every LN must be fused."""
    check_properties(spec)


@_SETTINGS
@given(chains(genuine=0.2, lookalike=0.7, max_blocks=4))
def test_lookalike_chains(spec: ChainSpec) -> None:
    """Mostly look-alikes: none may be fused, outputs unchanged."""
    check_properties(spec)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_refused(mutation: str) -> None:
    """One deterministic look-alike per mutation (the generator's own sanity check)."""
    blocks: tuple[LNBlock | OtherBlock, ...]
    base = LNBlock(
        mutation=mutation,
        detail={"pow_odd": "4", "axes_mismatch": "last2", "extra_output": "var"}.get(mutation, ""),
    )
    blocks = (base, OtherBlock("relu"))
    spec = ChainSpec(F32, 17, 1, 4, 4, blocks, seed=7)
    check_properties(spec)


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("denom", DENOMS)
def test_each_genuine_form_is_fused(variance: str, denom: str) -> None:
    """Every variance x denominator combination of the generator, fp32, fused exactly once."""
    spec = ChainSpec(
        F32, 17, "batch", 3, 8, (LNBlock(variance=variance, denom=denom), OtherBlock("matmul")), seed=3
    )
    check_properties(spec)


# --------------------------------------------------------------------------------------------------
# regressions: the shrunk examples this generator found (each was a missed fusion in the core)

# _POLICY: an LN without beta followed by an Add of a constant that varies along a non-normalized
# axis (LN over axis -2 then Add(bias [H]); LN then Add(table [S, H])) is refused whole, like the
# "gamma/beta broadcasting over a non-normalized axis" look-alike it is indistinguishable from.

REGRESSIONS = [
    pytest.param(
        ChainSpec(F32, 18, 2, 3, 8, (LNBlock(axes="last2"),), seed=1),
        id="axes-input-two-axes-opset18",  # the int64 axes tensor [2] was taken for a coefficient
    ),
    pytest.param(
        ChainSpec(F32, 13, 2, 3, 8, (LNBlock(axes="last2", variance="unbiased_sum"),), seed=1),
        id="reducesum-axes-input-opset13",
    ),
    pytest.param(
        ChainSpec(
            F32, 17, 2, 3, 8, (LNBlock(gamma=False, beta=False), LNBlock(gamma=False, beta=False)), seed=2
        ),
        id="affine-free-ln-then-ln",  # mean(LN(x)) == 0 exactly: the first match swallowed the second's centring
    ),
    pytest.param(
        ChainSpec(F32, 17, 2, 3, 8, (LNBlock(), LNBlock(island=True)), seed=3),
        id="fp32-ln-then-cast-to-double",  # proof used the fp64 tolerance for an fp32 computation
    ),
    pytest.param(
        ChainSpec(F64, 17, 2, 3, 8, (LNBlock(island=True),), seed=4),
        id="fp64-fp32-fp64-island",
    ),
    pytest.param(
        ChainSpec(
            F64, 17, 1, 3, 8, (LNBlock(), LNBlock(island=True, positive_axes=True, axes="mid")), seed=5
        ),
        id="ln-then-narrowing-island-positive-axes",  # proof shape had the wrong rank
    ),
    pytest.param(
        ChainSpec(F32, 11, 2, 3, 8, (LNBlock(variance="unbiased_sum"),), seed=6),
        id="opset11-reducesum-axes-attribute",  # proof ran opset-11 nodes at opset 17
    ),
    pytest.param(
        ChainSpec(
            F64,
            11,
            1,
            3,
            11,
            (LNBlock(style="keras", gamma=False, beta=False, axes="mid", eps=0.01),),
            seed=0,
        ),
        id="fp64-eps-not-float32",  # the float32 epsilon attribute was outside the fp64 proof tolerance
    ),
    pytest.param(
        ChainSpec(
            F32,
            11,
            1,
            3,
            4,
            (
                LNBlock(variance="one_pass_mul", gamma=False, beta=False, axes="mid", eps=0.01),
                OtherBlock("add_const", detail="vector"),
            ),
            seed=0,
        ),
        id="ln-over-axis-2-then-add-bias-H",  # refused on purpose (policy: see _POLICY)
    ),
    pytest.param(
        ChainSpec(F32, 17, 2, 3, 8, (LNBlock(beta=False), OtherBlock("add_const", detail="vector")), seed=7),
        id="ln-without-beta-then-add-bias-H",  # the Add becomes beta: fine
    ),
]


@pytest.mark.parametrize("spec", REGRESSIONS)
def test_regressions(spec: ChainSpec) -> None:
    check_properties(spec)
