"""Builders for the fixture models: decomposed LayerNorm/RMSNorm subgraphs and their look-alikes.

Every :class:`Case` builds one tiny ONNX model with ``onnx.helper``, shaped exactly like the graph a
named exporter (PyTorch's TorchScript exporter, tf2onnx, ONNX function expansion) or a hand-written
module produces. These models are the ground truth the matcher is tested against, so they are built
from what the exporters write, never from what a matcher looks for.

* ``POSITIVE``: graphs that hold one or more LayerNorms (or an RMSNorm with ``options={"rmsnorm": True}``)
  that must be fused; ``Case.reference`` computes the expected output in float64 numpy from the
  same parameters that were baked into the model.
* ``NEGATIVE``: look-alikes that are not a LayerNorm (or cannot be rewritten exactly); the op list
  must come out unchanged.

Conventions: graph input ``x``, first graph output ``y``, ``ir_version`` set from the opset
(see :func:`ir_version_for`), gamma/beta drawn from a numpy generator seeded by the case name.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.inline import inline_local_functions

__all__ = [
    "ALL",
    "DIMS",
    "NEGATIVE",
    "POSITIVE",
    "Case",
    "ir_version_for",
    "make_input",
    "reference_layernorm",
    "reference_rmsnorm",
]

Dim = Union[int, str]
Shape = tuple[Dim, ...]

#: Concrete sizes used for the symbolic dimensions when a test feeds a model.
DIMS: dict[str, int] = {"batch": 2, "seq": 5, "time": 7, "hidden": 24, "n": 3}


@dataclass(frozen=True)
class Case:
    """One fixture model and what the optimizer must do with it."""

    name: str
    build: Callable[[], onnx.ModelProto]
    expect_ln: int
    expect_rms: int = 0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    rtol: Optional[float] = None
    issue: int = 2
    why: str = ""
    #: float64 numpy reference of output ``y`` given the input ``x`` (positive cases only).
    reference: Optional[Callable[[np.ndarray], np.ndarray]] = field(
        default=None, hash=False, compare=False, repr=False
    )
    #: False where the graph itself gives NaN on ordinary inputs (a look-alike that is no norm).
    finite: bool = True


def ir_version_for(opset: int) -> int:
    """IR version written for a default-domain opset (onnxruntime 1.31 reads IR <= 13)."""
    if opset <= 17:
        return 8
    if opset <= 21:
        return 10
    return 11


def make_input(
    model: onnx.ModelProto, seed: int = 0, scale: float = 1.0, dims: Mapping[str, int] | None = None
) -> np.ndarray:
    """Seeded test input for graph input ``x``: normal(mean 0.5, std 1) * scale, symbolic dims from DIMS."""
    dims = dict(DIMS if dims is None else dims)
    (x_info,) = [i for i in model.graph.input if i.name == "x"]
    ttype = x_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in ttype.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(shape) + 0.5) * scale).astype(dtype)


def reference_layernorm(
    x: np.ndarray,
    *,
    axes: Sequence[int],
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    ddof: int = 0,
) -> np.ndarray:
    """Two-pass LayerNorm in float64 over ``axes``; ``ddof=1`` gives the unbiased-variance variant."""
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(axes)
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    n = math.prod(x.shape[a] for a in axes)
    var = (d * d).sum(axis=axes, keepdims=True) / (n - ddof)
    y = d / np.sqrt(var + eps)
    if gamma is not None:
        y = y * np.asarray(gamma, dtype=np.float64)
    if beta is not None:
        y = y + np.asarray(beta, dtype=np.float64)
    return y


def reference_rmsnorm(x: np.ndarray, *, eps: float, weight: np.ndarray, axis: int = -1) -> np.ndarray:
    """RMSNorm in float64 over one axis: x / sqrt(mean(x^2) + eps) * weight."""
    x = np.asarray(x, dtype=np.float64)
    ms = (x * x).mean(axis=axis, keepdims=True)
    return x / np.sqrt(ms + eps) * np.asarray(weight, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# graph building helpers


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _affine(name: str, shape: Shape, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Seeded non-trivial gamma (around 1) and beta (around 0) of ``shape``."""
    rng = np.random.default_rng(_seed(name))
    gamma = (1.0 + 0.3 * rng.standard_normal(shape)).astype(dtype)
    beta = (0.2 * rng.standard_normal(shape)).astype(dtype)
    return gamma, beta


def _as(value: float, dtype: Any) -> float:
    """The float64 value of ``value`` once stored as ``dtype`` (what the graph really holds)."""
    return float(np.asarray(value, dtype=dtype))


def _last_axis_ln(
    eps: float, eps_dtype: Any, gamma: np.ndarray, beta: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """Reference LayerNorm over the last axis with eps as stored in ``eps_dtype``."""
    e = _as(eps, eps_dtype)
    return lambda x: reference_layernorm(x, axes=[-1], eps=e, gamma=gamma, beta=beta)


class _Graph:
    """Minimal onnx.helper graph builder that names nodes and outputs the way torch.onnx does."""

    def __init__(self, opset: int, scope: str = "") -> None:
        self.opset = opset
        self.scope = scope
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._seen: Counter[str] = Counter()

    def _unique(self, base: str) -> str:
        k = self._seen[base]
        self._seen[base] += 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Append a node with one output; returns the output name."""
        name = self._unique(f"{self.scope}/{op_type}")
        output = out or f"{name}_output_0"
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const(self, array: Any, dtype: Any, form: str = "node") -> str:
        """A constant as a Constant node (torch style) or as an initializer (tf2onnx style)."""
        arr = np.asarray(array, dtype=dtype)
        if form == "node":
            return self.op("Constant", value=numpy_helper.from_array(arr))
        return self.init(self._unique(f"{self.scope.strip('/') or 'const'}.const"), arr)

    def param(self, name: str, array: np.ndarray, form: str = "init") -> str:
        """A gamma/beta tensor: initializer, Constant node, or Identity of an initializer."""
        if form == "init":
            return self.init(name, array)
        if form == "constant":
            return self.op("Constant", value=numpy_helper.from_array(array))
        if form == "identity":
            return self.op("Identity", self.init(name, array))
        raise ValueError(form)

    def reduce(
        self,
        op_type: str,
        x: str,
        axes: Sequence[int],
        keepdims: int | None = None,
        consts: str = "node",
    ) -> str:
        """ReduceMean/ReduceSum with axes as attribute or as input, as the opset requires."""
        axes_as_input = (op_type == "ReduceSum" and self.opset >= 13) or self.opset >= 18
        if axes_as_input:
            ax = self.const(list(axes), np.int64, consts)
            return self.op(op_type, x, ax, keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def input(self, name: str, dtype: Any, shape: Shape) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, dtype: Any, shape: Shape) -> None:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            ir_version=ir_version_for(self.opset),
            producer_name="lnfuse.models",
        )


def _ln_chain(
    g: _Graph,
    x: str,
    *,
    axes: Sequence[int],
    eps: float,
    dtype: Any,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    affine: str = "init",
    param_names: tuple[str, str] = ("gamma", "beta"),
    square: str = "pow",
    variance: str = "two_pass",
    n_reduced: int | None = None,
    denom: str = "div",
    keepdims: int | None = None,
    mean_keepdims: int | None = None,
    var_axes: Sequence[int] | None = None,
    mean_op: str = "ReduceMean",
    var_op: str = "ReduceMean",
    mean_twice: bool = False,
    commuted: bool = False,
    sub_reversed: bool = False,
    div_reversed: bool = False,
    eps_outside_sqrt: bool = False,
    consts: str = "node",
    out: str | None = None,
) -> dict[str, str]:
    """Append a decomposed LayerNorm to ``g`` (node order as torch.onnx writes it).

    Knobs select each variation: ``square`` pow|mul|pow3; ``variance`` two_pass|one_pass_mul|
    one_pass_pow|unbiased_sum|unbiased_mul|of_x; ``denom`` div|reciprocal_mul|
    div_one_mul|pow_neg_half|pow_half_div. Returns the names of the intermediates.
    """
    k = keepdims
    c: dict[str, str] = {}

    def scalar(v: float) -> str:
        return g.const(v, dtype, consts)

    def mul(a: str, b: str, **kw: Any) -> str:
        return g.op("Mul", b, a, **kw) if commuted else g.op("Mul", a, b, **kw)

    mean = g.reduce(mean_op, x, axes, mean_keepdims if mean_keepdims is not None else k, consts)
    d = g.op("Sub", mean, x) if sub_reversed else g.op("Sub", x, mean)
    c["mean"], c["d"] = mean, d
    v_axes = axes if var_axes is None else var_axes

    if variance in ("two_pass", "unbiased_sum", "unbiased_mul"):
        if square == "pow":
            sq = g.op("Pow", d, scalar(2.0))
        elif square == "pow3":
            sq = g.op("Pow", d, scalar(3.0))
        elif square == "mul":
            sq = g.op("Mul", d, d)
        else:
            raise ValueError(square)
        if variance == "two_pass":
            var = g.reduce(var_op, sq, v_axes, k, consts)
        elif variance == "unbiased_sum":
            assert n_reduced is not None
            var = g.op("Div", g.reduce("ReduceSum", sq, v_axes, k, consts), scalar(n_reduced - 1))
        else:  # unbiased_mul
            assert n_reduced is not None
            var = mul(g.reduce("ReduceMean", sq, v_axes, k, consts), scalar(n_reduced / (n_reduced - 1)))
    elif variance == "one_pass_mul":
        m2 = g.reduce("ReduceMean", g.op("Mul", x, x), v_axes, k, consts)
        var = g.op("Sub", m2, g.op("Mul", mean, mean))
    elif variance == "one_pass_pow":
        m2 = g.reduce("ReduceMean", g.op("Pow", x, scalar(2.0)), v_axes, k, consts)
        var = g.op("Sub", m2, g.op("Pow", mean, scalar(2.0)))
    elif variance == "of_x":
        var = g.reduce("ReduceMean", g.op("Pow", x, scalar(2.0)), v_axes, k, consts)
    else:
        raise ValueError(variance)
    c["var"] = var

    num = d
    if mean_twice:
        mean2 = g.reduce(mean_op, x, axes, k, consts)
        num = g.op("Sub", x, mean2)
        c["mean2"], c["d2"] = mean2, num

    last = gamma is None and beta is None
    norm_out = out if last else None
    if eps_outside_sqrt:
        std = g.op("Add", g.op("Sqrt", var), scalar(eps))
        norm = g.op("Div", num, std, out=norm_out)
    else:
        e = scalar(eps)
        ve = g.op("Add", e, var) if commuted else g.op("Add", var, e)
        if denom == "div":
            std = g.op("Sqrt", ve)
            norm = (
                g.op("Div", std, num, out=norm_out) if div_reversed else g.op("Div", num, std, out=norm_out)
            )
        elif denom == "pow_half_div":
            std = g.op("Pow", ve, scalar(0.5))
            norm = g.op("Div", num, std, out=norm_out)
        elif denom == "reciprocal_mul":
            std = g.op("Sqrt", ve)
            norm = mul(num, g.op("Reciprocal", std), out=norm_out)
        elif denom == "div_one_mul":
            std = g.op("Sqrt", ve)
            norm = mul(num, g.op("Div", scalar(1.0), std), out=norm_out)
        elif denom == "pow_neg_half":
            std = g.op("Pow", ve, scalar(-0.5))
            norm = mul(num, std, out=norm_out)
        else:
            raise ValueError(denom)
    c["std"], c["norm"] = std, norm

    y = norm
    if gamma is not None:
        gname = g.param(param_names[0], gamma, affine)
        y = mul(y, gname, out=out if beta is None else None)
    if beta is not None:
        bname = g.param(param_names[1], beta, affine)
        y = g.op("Add", bname, y, out=out) if commuted else g.op("Add", y, bname, out=out)
    c["out"] = y
    return c


def _ln_case(
    name: str,
    *,
    why: str,
    H: int = 32,
    shape: Shape | None = None,
    opset: int = 17,
    dtype: Any = np.float32,
    eps: float = 1e-5,
    axes: Sequence[int] = (-1,),
    affine_shape: Shape | None = None,
    with_gamma: bool = True,
    with_beta: bool = True,
    scope: str = "/ln",
    expect_ln: int = 1,
    rtol: float | None = None,
    issue: int = 2,
    ddof: int = 0,
    post: Callable[[_Graph, dict[str, str]], None] | None = None,
    finite: bool = True,
    **knobs: Any,
) -> Case:
    """A case made of one decomposed LN chain from ``x`` to ``y`` (``post`` may add extra outputs)."""
    shape = tuple(shape or ("batch", "seq", H))
    if affine_shape is None:
        affine_shape = tuple(shape[a] for a in axes)
    gamma_or_none = beta_or_none = None
    if with_gamma or with_beta:
        gamma, beta = _affine(name, affine_shape, dtype)
        gamma_or_none = gamma if with_gamma else None
        beta_or_none = beta if with_beta else None

    def build() -> onnx.ModelProto:
        g = _Graph(opset, scope)
        x = g.input("x", dtype, shape)
        names = _ln_chain(
            g, x, axes=axes, eps=eps, dtype=dtype, gamma=gamma_or_none, beta=beta_or_none, out="y", **knobs
        )
        g.output("y", dtype, shape)
        if post is not None:
            post(g, names)
        return g.model(name)

    reference = None
    if expect_ln:
        ref_eps = _as(eps, dtype)

        def reference(x: np.ndarray) -> np.ndarray:
            return reference_layernorm(
                x, axes=axes, eps=ref_eps, gamma=gamma_or_none, beta=beta_or_none, ddof=ddof
            )

    return Case(
        name=name,
        build=build,
        expect_ln=expect_ln,
        rtol=rtol,
        issue=issue,
        why=why,
        reference=reference,
        finite=finite,
    )


# --------------------------------------------------------------------------------------------------
# hand-built positives


def _torch_case(name: str, opset: int, H: int, eps: float, why: str, **kw: Any) -> Case:
    """nn.LayerNorm as torch.onnx (TorchScript) writes it below opset 17."""
    return _ln_case(
        name,
        why=why,
        H=H,
        opset=opset,
        eps=eps,
        scope="/norm",
        param_names=("norm.weight", "norm.bias"),
        **kw,
    )


def _cast_island_fp16() -> Case:
    name, H, eps = "cast_island_fp16", 32, 1e-5
    gamma, beta = _affine(name, (H,), np.float32)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(17, "/ln")
        x = g.input("x", np.float16, shape)
        x32 = g.op("Cast", x, to=TensorProto.FLOAT)
        c = _ln_chain(g, x32, axes=[-1], eps=eps, dtype=np.float32, gamma=gamma, beta=beta)
        g.op("Cast", c["out"], to=TensorProto.FLOAT16, out="y")
        g.output("y", np.float16, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=1,
        why="autocast island: fp16 x -> Cast fp32 -> full fp32 LN with fp32 gamma/beta -> Cast fp16",
        reference=_last_axis_ln(eps, np.float32, gamma, beta),
    )


def _fp32_stats_in_fp16_model() -> Case:
    name, H, eps = "fp32_stats_in_fp16_model", 48, 1e-6
    gamma, beta = _affine(name, (H,), np.float16)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(17, "/ln")
        x = g.input("x", np.float16, shape)
        x32 = g.op("Cast", x, to=TensorProto.FLOAT)
        c = _ln_chain(g, x32, axes=[-1], eps=eps, dtype=np.float32)
        h = g.op("Cast", c["out"], to=TensorProto.FLOAT16)
        h = g.op("Mul", h, g.init("ln.weight", gamma))
        g.op("Add", h, g.init("ln.bias", beta), out="y")
        g.output("y", np.float16, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=1,
        why="fp16 model, statistics and normalization in fp32 (Cast in/out), then fp16 Mul gamma, Add beta",
        reference=_last_axis_ln(eps, np.float32, gamma, beta),
    )


def _keras_form() -> Case:
    name, H, eps = "keras_form", 24, 1e-3
    gamma, beta = _affine(name, (H,), np.float32)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(13, "/layer_normalization")
        x = g.input("x", np.float32, shape)
        mean = g.reduce("ReduceMean", x, [-1], keepdims=1)
        sd = g.op("Sub", x, mean)  # SquaredDifference lowered by tf2onnx: Sub then Mul(d, d)
        var = g.reduce("ReduceMean", g.op("Mul", sd, sd), [-1], keepdims=1)
        ve = g.op("Add", var, g.const(eps, np.float32, "init"))
        inv = g.op("Reciprocal", g.op("Sqrt", ve))  # Rsqrt
        s = g.op("Mul", inv, g.init("layer_normalization/gamma", gamma))  # inv *= scale
        xs = g.op("Mul", x, s)
        ms = g.op("Mul", mean, s)
        b = g.op("Sub", g.init("layer_normalization/beta", beta), ms)
        g.op("Add", xs, b, out="y")
        g.output("y", np.float32, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=1,
        why="tf.nn.batch_normalization as Keras LayerNormalization uses it: y = x*s + (beta - mean*s), s = gamma*rsqrt(var+eps)",
        reference=_last_axis_ln(eps, np.float32, gamma, beta),
    )


def _gamma_on_numerator() -> Case:
    name, H, eps = "gamma_on_numerator", 32, 1e-5
    gamma, beta = _affine(name, (H,), np.float32)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(17, "/ln")
        x = g.input("x", np.float32, shape)
        mean = g.reduce("ReduceMean", x, [-1])
        d = g.op("Sub", x, mean)
        scaled = g.op("Mul", d, g.init("gamma", gamma))
        var = g.reduce("ReduceMean", g.op("Pow", d, g.const(2.0, np.float32)), [-1])
        std = g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32)))
        g.op("Add", g.op("Div", scaled, std), g.init("beta", beta), out="y")
        g.output("y", np.float32, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=1,
        why="hand-written ((x - mean) * gamma) / sqrt(var + eps) + beta: gamma applied before the division",
        reference=_last_axis_ln(eps, np.float32, gamma, beta),
    )


def _transformer_two_ln() -> Case:
    name, H = "transformer_two_ln", 32
    g1, b1 = _affine(name + ".ln1", (H,), np.float32)
    g2, b2 = _affine(name + ".ln2", (H,), np.float32)
    rng = np.random.default_rng(_seed(name))
    w = (rng.standard_normal((H, H)) / math.sqrt(H)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(H)).astype(np.float32)
    eps1, eps2 = 1e-12, 1e-5
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(14, "/block/ln1")
        x = g.input("x", np.float32, shape)
        c1 = _ln_chain(
            g, x, axes=[-1], eps=eps1, dtype=np.float32, gamma=g1, beta=b1,
            param_names=("block.ln1.weight", "block.ln1.bias"),
        )  # fmt: skip
        g.scope = "/block/fc"
        h = g.op("MatMul", c1["out"], g.init("block.fc.weight", w))
        h = g.op("Add", g.init("block.fc.bias", bias), h)
        g.scope = "/block"
        r = g.op("Add", x, h)
        g.scope = "/block/ln2"
        _ln_chain(
            g, r, axes=[-1], eps=eps2, dtype=np.float32, gamma=g2, beta=b2,
            param_names=("block.ln2.weight", "block.ln2.bias"), out="y",
        )  # fmt: skip
        g.output("y", np.float32, shape)
        return g.model(name)

    def reference(x: np.ndarray) -> np.ndarray:
        e1, e2 = _as(eps1, np.float32), _as(eps2, np.float32)
        h = reference_layernorm(x, axes=[-1], eps=e1, gamma=g1, beta=b1) @ w.astype(np.float64) + bias
        return reference_layernorm(np.asarray(x, np.float64) + h, axes=[-1], eps=e2, gamma=g2, beta=b2)

    return Case(
        name,
        build,
        expect_ln=2,
        why="pre-LN block as torch.onnx opset 14 writes it: LN1 -> MatMul + bias -> residual Add -> LN2",
        reference=reference,
    )


def _one_pass(name: str, variance: str, eps: float, H: int, why: str) -> Case:
    return _ln_case(name, why=why, H=H, eps=eps, variance=variance, rtol=1e-4, issue=5)


def _rmsnorm_llama(name: str, rsqrt: str) -> Case:
    """LLaMA/T5 RMSNorm (fp16 model, fp32 statistics) as torch.onnx (TorchScript) writes it."""
    H, eps = 64, 1e-6
    rng = np.random.default_rng(_seed("rmsnorm_llama"))
    weight = (1.0 + 0.3 * rng.standard_normal(H)).astype(np.float16)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(17, "/model/layers.0/input_layernorm")
        x = g.input("x", np.float16, shape)
        x32 = g.op("Cast", x, to=TensorProto.FLOAT)
        ms = g.reduce("ReduceMean", g.op("Pow", x32, g.const(2.0, np.float32)), [-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32)))
        if rsqrt == "div_one":
            r = g.op("Div", g.const(1.0, np.float32), std)
        else:
            r = g.op("Reciprocal", std)
        h = g.op("Cast", g.op("Mul", x32, r), to=TensorProto.FLOAT16)
        g.op("Mul", g.init("model.layers.0.input_layernorm.weight", weight), h, out="y")
        g.output("y", np.float16, shape)
        return g.model(name)

    if rsqrt == "div_one":
        why = (
            "LLaMA/T5 RMSNorm, torch.onnx opset 17 (checked against torch 2.11 TorchScript export): fp16 x -> Cast fp32 "
            "-> Pow 2 -> ReduceMean(keepdims=1) -> Add eps -> Sqrt -> Div(1.0, .) (torch.rsqrt) -> Mul x -> Cast fp16 -> weight * h"
        )
    else:
        why = "the rmsnorm_llama graph with rsqrt written as Sqrt -> Reciprocal (hand-written / other exporters)"
    return Case(
        name,
        build,
        expect_ln=0,
        expect_rms=1,
        options={"rmsnorm": True},
        issue=5,
        why=why,
        reference=lambda x: reference_rmsnorm(x, eps=_as(eps, np.float32), weight=weight),
    )


def _torch_half_opset16() -> Case:
    name, H, eps = "torch_half_opset16", 32, 1e-5
    gamma, beta = _affine(name, (H,), np.float16)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(16, "/norm")
        x = g.input("x", np.float16, shape)
        mean = g.reduce("ReduceMean", x, [-1])
        d = g.op("Sub", x, mean)
        d64 = g.op("Cast", d, to=TensorProto.DOUBLE)
        var = g.reduce("ReduceMean", g.op("Pow", d64, g.const(2.0, np.float64)), [-1])
        std = g.op("Sqrt", g.op("Add", var, g.const(eps, np.float64)))
        h = g.op("Cast", g.op("Div", d64, std), to=TensorProto.FLOAT16)
        h = g.op("Mul", h, g.init("norm.weight", gamma))
        g.op("Add", h, g.init("norm.bias", beta), out="y")
        g.output("y", np.float16, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=1,
        why=(
            "nn.LayerNorm().half(), torch.onnx opset 16 (checked against torch 2.11): mean and x - mean in fp16, "
            "Cast to double for Pow/ReduceMean/Add/Sqrt/Div (double constants), Cast fp16, Mul/Add fp16 weight/bias"
        ),
        reference=_last_axis_ln(eps, np.float64, gamma, beta),
    )


def _rmsnorm_plain(name: str, rmsnorm: bool) -> Case:
    H, eps = 32, 1e-5
    rng = np.random.default_rng(_seed("rmsnorm_plain_fp32"))
    weight = (1.0 + 0.3 * rng.standard_normal(H)).astype(np.float32)
    shape: Shape = ("batch", "seq", H)

    def build() -> onnx.ModelProto:
        g = _Graph(18, "/rms")
        x = g.input("x", np.float32, shape)
        ms = g.reduce("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32, "init")), [-1], 1, "init")
        rms = g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32, "init")))
        g.op("Mul", g.op("Div", x, rms), g.init("rms.weight", weight), out="y")
        g.output("y", np.float32, shape)
        return g.model(name)

    if rmsnorm:
        return Case(
            name,
            build,
            expect_ln=0,
            expect_rms=1,
            options={"rmsnorm": True},
            issue=5,
            why="plain fp32 RMSNorm x / Sqrt(ReduceMean(x^2) + eps) * gamma at opset 18 (axes as input)",
            reference=lambda x: reference_rmsnorm(x, eps=_as(eps, np.float32), weight=weight),
        )
    return Case(
        name,
        build,
        expect_ln=0,
        issue=5,
        why="the rmsnorm_plain_fp32 graph under default options: RMSNorm fusion is opt-in, so nothing changes",
    )


def _function_expanded() -> Case:
    name, H, eps = "function_expanded", 48, 1e-5
    gamma, beta = _affine(name, (H,), np.float32)
    shape: Shape = ("batch", "seq", H)
    domain = "lnfuse.expand"

    def build() -> onnx.ModelProto:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
        node = helper.make_node(
            "LayerNormalization", ["x", "gamma", "beta"], ["y", "mean", "inv_std_dev"], axis=-1, epsilon=eps
        )
        param_type = helper.make_tensor_type_proto(TensorProto.FLOAT, [H])
        schema = onnx.defs.get_schema("LayerNormalization", 17)
        body = onnx.FunctionProto()
        body.ParseFromString(
            schema.get_context_dependent_function_with_opset_version(
                17,
                node.SerializeToString(),
                [x_info.type.SerializeToString()] + [param_type.SerializeToString()] * 2,
            )
        )
        # Re-home the schema's function as a model-local function so it can be inlined
        # (models.inline: what onnx.inliner does, also on onnx < 1.15).
        body.domain = domain
        node.domain = domain
        del node.attribute[:]
        graph = helper.make_graph(
            [node],
            name,
            [x_info],
            [y_info],
            [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")],
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
            ir_version=ir_version_for(17),
            producer_name="lnfuse.models",
            functions=[body],
        )
        model = inline_local_functions(model)
        kept = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        return model

    return Case(
        name,
        build,
        expect_ln=1,
        rtol=1e-4,
        why=(
            "LayerNormalization-17 context-dependent function body (onnx.defs schema, onnx 1.23) inlined by "
            "onnx.inliner for a node with all 3 outputs bound: Flatten/Cast, one-pass variance "
            "E[x^2]-E[x]^2, Div, Reshape back; Mean/InvStdDev (Reciprocal, Reshape) computed but unused"
        ),
        reference=_last_axis_ln(eps, np.float32, gamma, beta),
    )


# --------------------------------------------------------------------------------------------------
# hand-built negatives


def _post_extra_output(
    op_type: str, of: str, out: str, out_shape: Shape
) -> Callable[[_Graph, dict[str, str]], None]:
    def post(g: _Graph, names: dict[str, str]) -> None:
        g.op(op_type, names[of], out=out)
        g.output(out, np.float32, out_shape)

    return post


def _post_centered_output(g: _Graph, names: dict[str, str]) -> None:
    g.output(names["d"], np.float32, ("batch", "seq", 32))


def _neg_groupnorm_like() -> Case:
    name, C, G, eps = "neg_groupnorm_like", 8, 2, 1e-5
    rng = np.random.default_rng(_seed(name))
    gamma = (1.0 + 0.3 * rng.standard_normal((C, 1, 1))).astype(np.float32)
    beta = (0.2 * rng.standard_normal((C, 1, 1))).astype(np.float32)
    shape: Shape = ("n", C, 4, 4)

    def build() -> onnx.ModelProto:
        g = _Graph(17, "/gn")
        x = g.input("x", np.float32, shape)
        xr = g.op("Reshape", x, g.const([0, G, -1], np.int64))
        c = _ln_chain(g, xr, axes=[-1], eps=eps, dtype=np.float32)
        h = g.op("Reshape", c["out"], g.op("Shape", x))
        h = g.op("Mul", h, g.init("gn.weight", gamma))
        g.op("Add", h, g.init("gn.bias", beta), out="y")
        g.output("y", np.float32, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=0,
        why=(
            "hand-written GroupNorm: Reshape [N, G, -1], stats over -1, Reshape back, per-channel gamma/beta [C,1,1] "
            "(note: the inner Reshape..Div is itself a valid affine-free LN)"
        ),
    )


def _neg_unbiased_dynamic_n() -> Case:
    name, eps = "neg_unbiased_dynamic_n", 1e-5
    shape: Shape = ("batch", "seq", "hidden")

    def build() -> onnx.ModelProto:
        g = _Graph(17, "")
        x = g.input("x", np.float32, shape)
        mean = g.reduce("ReduceMean", x, [-1], keepdims=1)
        mean_v = g.reduce("ReduceMean", x, [-1], keepdims=1)
        n = g.op("Gather", g.op("Shape", x), g.const([-1], np.int64), axis=0)
        n = g.op("ReduceProd", n, keepdims=0)
        dv = g.op("Sub", x, mean_v)
        var_b = g.reduce("ReduceMean", g.op("Mul", dv, dv), [-1], keepdims=1)
        n_f = g.op("Cast", n, to=TensorProto.FLOAT)
        var = g.op("Div", g.op("Mul", var_b, n_f), g.op("Sub", n_f, g.const(1.0, np.float32)))
        d = g.op("Sub", x, mean)
        std = g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32)))
        g.op("Div", d, std, out="y")
        g.output("y", np.float32, shape)
        return g.model(name)

    return Case(
        name,
        build,
        expect_ln=0,
        why=(
            "(x - mean) / sqrt(x.var(-1, unbiased=True) + eps) as torch.onnx opset 17 writes it (checked against torch 2.11): "
            "var = ReduceMean(d*d) * N / (N - 1), N = ReduceProd(Shape(x)[-1]) with H dynamic: eps cannot be rescaled exactly"
        ),
    )


# --------------------------------------------------------------------------------------------------
# the case lists

POSITIVE: tuple[Case, ...] = (
    _torch_case("torch_opset11", 11, 32, 1e-5, "nn.LayerNorm, torch.onnx opset 11 (nodes, names and order as torch 2.11 writes them; eps 1e-5 stored fp32 = 9.999999747378752e-06)"),
    _torch_case("torch_opset14", 14, 64, 1e-12, "nn.LayerNorm(eps=1e-12) (BERT), torch.onnx opset 14"),
    _torch_case("torch_opset16", 16, 16, 1e-6, "nn.LayerNorm(eps=1e-6), torch.onnx opset 16"),
    _ln_case(
        "torch_mean_twice", H=24, eps=1e-5, mean_twice=True,
        why="x.mean() written twice: one ReduceMean/Sub pair feeds Pow, the other the Div numerator",
    ),
    _ln_case("square_mul", H=32, eps=1e-3, square="mul", why="variance of Mul(d, d) instead of Pow(d, 2)"),
    _ln_case(
        "denom_reciprocal_mul", H=32, eps=1e-5, denom="reciprocal_mul",
        why="Sqrt -> Reciprocal -> Mul(d, r) (hand-written torch.reciprocal(torch.sqrt(.)))",
    ),
    _ln_case("denom_div_one_mul", H=48, eps=2e-5, denom="div_one_mul", why="r = Div(1.0, Sqrt(var + eps)) -> Mul(d, r) (torch.rsqrt as torch.onnx writes it)"),
    _ln_case("denom_pow_neg_half", H=16, eps=1e-6, denom="pow_neg_half", why="r = Pow(var + eps, -0.5) -> Mul(d, r)"),
    _ln_case("denom_pow_half_div", H=32, eps=5e-6, denom="pow_half_div", why="std = Pow(var + eps, 0.5) -> Div(d, std)"),
    _ln_case(
        "axes_input_opset18", H=32, eps=1e-5, opset=18, keepdims=1,
        why="opset 18: ReduceMean axes as a Constant input, keepdims=1 explicit",
    ),
    _ln_case(
        "keepdims_explicit", H=24, eps=1e-6, opset=13, keepdims=1,
        why="opset 13 with keepdims=1 written explicitly on both ReduceMeans",
    ),
    _ln_case(
        "two_trailing_axes", shape=("batch", 8, 16), axes=(-2, -1), eps=1e-5,
        why="normalize over axes [-2, -1] of [B, S=8, H=16], gamma/beta [S, H]",
    ),
    _ln_case("positive_axes_static", shape=(2, 4, 32), axes=(2,), eps=1e-4, why="axes=[2] on static [2, 4, 32]"),
    _ln_case("affine_constant_nodes", H=32, eps=1e-5, affine="constant", why="gamma/beta as Constant nodes"),
    _ln_case("affine_identity", H=32, eps=1e-6, affine="identity", why="gamma/beta as Identity of an initializer"),
    _ln_case(
        "affine_shape_11h", H=32, eps=1e-12, affine_shape=(1, 1, 32),
        why="gamma/beta initializers shaped [1, 1, H]",
    ),
    _ln_case("no_beta", H=32, eps=1e-5, with_beta=False, why="Mul gamma only, no bias Add"),
    _ln_case(
        "no_affine", H=32, eps=1e-6, with_gamma=False, with_beta=False,
        why="elementwise_affine=False: output is the Div (fused op needs a ones Scale)",
    ),
    _ln_case(
        "commuted_all", H=32, eps=3e-5, denom="reciprocal_mul", commuted=True,
        why="every commutative op with swapped inputs: Add(eps, var), Mul(r, d), Mul(gamma, x_hat), Add(beta, .)",
    ),
    _ln_case(
        "eps_fp16_graph", shape=(2, 6, 32), eps=1e-4, dtype=np.float16,
        why="the whole chain in float16 (fp16 gamma/beta, eps and exponent), static shapes",
    ),
    _ln_case("eps_weird", H=32, eps=1.234567e-7, why="eps = 1.234567e-7 stored as fp32"),
    _cast_island_fp16(),
    _fp32_stats_in_fp16_model(),
    _torch_half_opset16(),
    _keras_form(),
    _gamma_on_numerator(),
    _transformer_two_ln(),
    _ln_case(
        "ln_output_is_graph_output_and_consumed", H=32, eps=1e-5,
        post=_post_extra_output("Relu", "out", "z", ("batch", "seq", 32)),
        why="LN output y is a graph output and also feeds a Relu (output z): only intermediates matter",
    ),
    _one_pass(
        "one_pass_variance", "one_pass_mul", 1e-5, 32,
        "var = ReduceMean(x*x) - Mul(mean, mean) (one-pass; exact only up to rounding)",
    ),
    _one_pass(
        "one_pass_variance_pow", "one_pass_pow", 1e-6, 24,
        "var = ReduceMean(Pow(x, 2)) - Pow(mean, 2) (one-pass; exact only up to rounding)",
    ),
    _ln_case(
        "unbiased_variance", H=32, eps=1e-5, variance="unbiased_sum", square="mul", n_reduced=32,
        ddof=1, issue=5, why="hand-written var = ReduceSum(d*d, [-1]) / (H-1), static H=32 (unbiased variance)",
    ),
    _ln_case(
        "unbiased_variance_mul", H=16, eps=1e-6, variance="unbiased_mul", n_reduced=16, ddof=1, issue=5,
        why="var = ReduceMean(d^2) * (H/(H-1)), static H=16",
    ),
    _ln_case(
        "channels_first_ln", shape=("batch", 24, "time"), axes=(1,), affine_shape=(24, 1), eps=1e-5, issue=5,
        why="[B, C, T] normalized over axis 1 (C) with gamma/beta [C, 1] (ConvNeXt/wav2vec style); rewrite needs Transposes",
    ),
    _rmsnorm_llama("rmsnorm_llama", "div_one"),
    _rmsnorm_llama("rmsnorm_llama_reciprocal", "reciprocal"),
    _rmsnorm_plain("rmsnorm_plain_fp32", rmsnorm=True),
    _ln_case(
        "fp16_decomposed_overflow", H=32, eps=1e-5, dtype=np.float16, issue=5,
        why="whole torch-style chain in fp16: Pow(d, 2) overflows for |x - mean| > 256; the fused op does not",
    ),
    _function_expanded(),
)  # fmt: skip

NEGATIVE: tuple[Case, ...] = (
    _ln_case(
        "neg_float64_statistics", H=32, eps=9.999999747378752e-06, dtype=np.float64, expect_ln=0, issue=11,
        why=(
            "the whole chain in float64 (x, gamma, beta, eps, exponent): left unfused, the standard op's "
            "stash_type allows float32/bfloat16 statistics only"
        ),
    ),
    _ln_case("neg_sub_reversed", expect_ln=0, sub_reversed=True, why="Sub(mean, x): the sign is flipped"),
    _ln_case("neg_div_reversed", expect_ln=0, div_reversed=True, why="Div(std, d): the inverse of a norm"),
    _ln_case(
        "neg_pow3", expect_ln=0, square="pow3", finite=False,
        why="Pow(d, 3): a third moment, not a variance (NaN where it is negative)",
    ),
    _ln_case(
        "neg_var_of_x", expect_ln=0, variance="of_x",
        why="variance = ReduceMean(x^2) without subtracting the mean, and no -mean^2 term",
    ),
    _ln_case("neg_reducesum_mean", expect_ln=0, mean_op="ReduceSum", why="ReduceSum instead of ReduceMean for the mean"),
    _ln_case(
        "neg_reducesum_var", expect_ln=0, var_op="ReduceSum",
        why="ReduceSum instead of ReduceMean for the variance, no division by N",
    ),
    _ln_case("neg_eps_outside_sqrt", expect_ln=0, eps_outside_sqrt=True, why="Sqrt(var) + eps: eps outside the root"),
    _ln_case(
        "neg_axes_mismatch", expect_ln=0, shape=("batch", 8, 32), var_axes=(-2, -1),
        why="mean over [-1], variance over [-2, -1]",
    ),
    _ln_case(
        "neg_nontrailing_stats_gamma_last", expect_ln=0, shape=("batch", 12, 32), axes=(1,), affine_shape=(32,),
        why="statistics over axis 1 of [B, S, H] but gamma/beta [H] vary over the last, non-normalized axis",
    ),
    _ln_case(
        "neg_keepdims0", expect_ln=0, shape=(1, 16, 16), mean_keepdims=0,
        why="mean with keepdims=0 on [1, S, H], S == H: Sub broadcasts mean[b, h] along rows, wrong per row",
    ),
    _ln_case(
        "neg_gamma_broadcast_batch", expect_ln=0, shape=(2, 6, 32), affine_shape=(2, 1, 1),
        why="gamma/beta [B, 1, 1] (static B=2) vary over the batch axis, which is not normalized",
    ),
    _ln_case(
        "neg_mean_consumed_outside", expect_ln=0,
        post=_post_extra_output("Neg", "mean", "neg_mean", ("batch", "seq", 1)),
        why="the mean also feeds a Neg whose output is a graph output",
    ),
    _ln_case(
        "neg_centered_is_graph_output", expect_ln=0, post=_post_centered_output,
        why="x - mean is also a graph output",
    ),
    _ln_case(
        "neg_variance_consumed_outside", expect_ln=0,
        post=_post_extra_output("Log", "var", "log_var", ("batch", "seq", 1)),
        why="the variance also feeds a Log whose output is a graph output",
    ),
    _ln_case(
        "neg_batchnorm_like", expect_ln=0, shape=("n", 16), axes=(0,), affine_shape=(16,),
        why="[N, C] with statistics over axis 0 (batch) and per-channel gamma/beta [C]",
    ),
    _ln_case(
        "neg_instancenorm_like", expect_ln=0, shape=("n", 6, 5, 5), axes=(2, 3), affine_shape=(6, 1, 1),
        why="[N, C, H, W] stats over [2, 3] with per-channel gamma/beta [C, 1, 1]",
    ),
    _neg_groupnorm_like(),
    _neg_unbiased_dynamic_n(),
    _rmsnorm_plain("neg_rmsnorm_without_flag", rmsnorm=False),
)  # fmt: skip

ALL: dict[str, Case] = {c.name: c for c in POSITIVE + NEGATIVE}
assert len(ALL) == len(POSITIVE) + len(NEGATIVE), "duplicate case names"
