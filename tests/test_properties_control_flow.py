"""Property-based tests for norms inside control flow: random If / Loop / Scan nestings.

A generator of its own wraps decomposed LayerNorms (``LN(x) * gamma + beta``, PyTorch form) or
RMSNorms (``x / sqrt(mean(x**2) + eps) * gamma``, ``rmsnorm=True``: the opset raised to 23) in a
random nesting, up to three deep, of ``If`` branches (the condition a graph input, so both
branches run), ``Loop`` bodies (the norm applied to the loop-carried value, a fixed trip count)
and ``Scan`` bodies (the norm applied to each scanned row; one Scan a nesting). Each norm's
gamma / beta / eps live where the draw puts them: initializers of the main graph (read from the
outer scope), Constant nodes inside the body, or initializers of the body itself. At most one
look-alike is drawn (for a LayerNorm the variance of ``x`` instead of ``x - mean``, or
``mean - x``; for an RMSNorm a centred numerator, or the variance in the denominator), which must
stay as it is.

Properties of ``lnfuse.optimize``: the output passes ``check_model(full_check=True)``; every
genuine norm, in whatever body, is one fused op of its kind, the look-alike none; the
outputs equal the original's on ONNX Runtime (``ORT_DISABLE_ALL``) with the condition true and
false; optimizing again changes nothing. ``LNFUSE_HYPOTHESIS_PROFILE=long`` runs 500 examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from graph_builder import GraphBuilder, run_ort
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lnfuse
from lnfuse.protos import iter_nodes

_SETTINGS = settings(
    max_examples=500 if os.environ.get("LNFUSE_HYPOTHESIS_PROFILE") == "long" else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F32, BOOL, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64
S, H = 3, 6  # x: [S, H]; a Scan scans its rows
WRAPS = ("if", "loop", "scan")
PARAMS = ("outer", "constant", "body_init")
LOOKALIKES = (None, None, None, "var_of_x", "mean_minus_x")
# RMSNorm (``rmsnorm=True``) needs opset 23, which onnx has from 1.18 on.
KINDS = ("ln", "rms") if onnx.defs.onnx_opset_version() >= 23 else ("ln",)
FUSED = {"ln": "LayerNormalization", "rms": "RMSNormalization"}


@dataclass(frozen=True)
class Spec:
    wraps: tuple[str, ...]  # outermost first
    kind: str  # ln | rms: every norm of the model
    params: str  # where each norm's gamma / beta / eps are
    norms_per_body: int
    lookalike: str | None
    seed: int


specs = st.builds(
    Spec,
    wraps=st.lists(st.sampled_from(WRAPS), min_size=1, max_size=3)
    .map(tuple)
    .filter(lambda w: w.count("scan") <= 1),
    kind=st.sampled_from(KINDS),
    params=st.sampled_from(PARAMS),
    norms_per_body=st.integers(1, 2),
    lookalike=st.sampled_from(LOOKALIKES),
    seed=st.integers(0, 2**31 - 1),
)


class _Builder(GraphBuilder):
    """Nodes go into the graph being built (``self.nodes``); the main graph's initializers are
    ``self.inits``, the current body's ``self.body_inits``."""

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec.seed)
        self.spec = spec
        self.body_inits: list[onnx.TensorProto] = []
        self.genuine = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const_at(self, value: Any, where: str, dtype: Any = np.float32) -> str:
        """``value`` where the draw puts parameters: ``outer`` (a main-graph initializer),
        ``constant`` (a Constant node here) or ``body_init`` (an initializer of this body)."""
        arr = np.asarray(value, dtype=dtype)
        if where == "constant":
            return self.op("Constant", [], value=numpy_helper.from_array(arr))[0]
        if where == "outer":
            return self.const(arr, dtype)
        name = self.name("c")
        self.body_inits.append(numpy_helper.from_array(arr, name))
        return name


def _norm(b: _Builder, x: str, look: str | None) -> str:
    """``LN(x) * gamma + beta`` (or ``x / rms(x) * gamma``) over the last axis, or the drawn
    look-alike of it: for an RMSNorm ``mean_minus_x`` centres the numerator and ``var_of_x`` puts
    the variance in the denominator."""
    where, rms = b.spec.params, b.spec.kind == "rms"
    gamma = b.const_at(1.0 + 0.2 * b.rng.standard_normal(H), where)
    beta = b.const_at(0.1 * b.rng.standard_normal(H), where)
    m = b.op("ReduceMean", [x], axes=[-1])[0]
    d = b.op("Sub", [m, x] if look == "mean_minus_x" else [x, m])[0]
    if rms:
        sq = b.op("Mul", [d, d] if look == "var_of_x" else [x, x])[0]
        num = d if look == "mean_minus_x" else x
    else:
        sq = b.op("Mul", [x, x] if look == "var_of_x" else [d, d])[0]
        num = d
    v = b.op("ReduceMean", [sq], axes=[-1])[0]
    n = b.op("Div", [num, b.op("Sqrt", [b.op("Add", [v, b.const_at(1e-5, where)])[0]])[0]])[0]
    b.genuine += look is None
    scaled = b.op("Mul", [n, gamma])[0]
    return scaled if rms else b.op("Add", [scaled, beta])[0]


def _norms(b: _Builder, x: str, look: str | None) -> str:
    for i in range(b.spec.norms_per_body):
        x = _norm(b, x, look if i == 0 else None)
        x = b.op("Tanh", [x])[0]  # between two norms: keeps them apart
    return x


def _body(b: _Builder, make: Any, inputs: list[onnx.ValueInfoProto], name: str) -> onnx.GraphProto:
    saved, saved_inits = b.nodes, b.body_inits
    b.nodes, b.body_inits = [], []
    outputs = make()
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.body_inits)
    b.nodes, b.body_inits = saved, saved_inits
    return graph


def _wrap(b: _Builder, wraps: tuple[str, ...], x: str, look: str | None, shape: list[int]) -> str:
    """``x`` (of ``shape``: [S, H], or [H] inside a Scan) through the nesting ``wraps``; the
    innermost body holds the norms."""
    if not wraps:
        return _norms(b, x, look)
    kind, inner = wraps[0], wraps[1:]
    if kind == "if":

        def then() -> list[onnx.ValueInfoProto]:
            return [helper.make_tensor_value_info(_wrap(b, inner, x, look, shape), F32, shape)]

        def other() -> list[onnx.ValueInfoProto]:
            return [
                helper.make_tensor_value_info(b.op("Neg", [_wrap(b, inner, x, None, shape)])[0], F32, shape)
            ]

        branches = {"then_branch": _body(b, then, [], "then"), "else_branch": _body(b, other, [], "else")}
        return b.op("If", ["cond"], **branches)[0]
    if kind == "loop":
        v = b.name("v")

        def step() -> list[onnx.ValueInfoProto]:
            out = b.op("Mul", [_wrap(b, inner, v, look, shape), b.const(1.5)])[0]
            return [
                helper.make_tensor_value_info(b.op("Identity", ["lc"])[0], BOOL, []),
                helper.make_tensor_value_info(out, F32, shape),
            ]

        ins = [
            helper.make_tensor_value_info(b.name("i"), I64, []),
            helper.make_tensor_value_info("lc", BOOL, []),
            helper.make_tensor_value_info(v, F32, shape),
        ]
        trips, keep = b.const(2, np.int64), b.const(True, np.bool_)
        return b.op("Loop", [trips, keep, x], body=_body(b, step, ins, "body"))[0]
    row = b.name("row")

    def scan() -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(_wrap(b, inner, row, look, shape[1:]), F32, shape[1:])]

    body = _body(b, scan, [helper.make_tensor_value_info(row, F32, shape[1:])], "scan")
    return b.op("Scan", [x], body=body, num_scan_inputs=1)[0]


def build(spec: Spec) -> tuple[onnx.ModelProto, int]:
    """The model and how many genuine norms it holds (in every body together)."""
    b = _Builder(spec)
    y = _wrap(b, spec.wraps, "x", spec.lookalike, [S, H])
    graph = helper.make_graph(
        b.nodes,
        "cf",
        [helper.make_tensor_value_info("x", F32, [S, H]), helper.make_tensor_value_info("cond", BOOL, [])],
        [helper.make_tensor_value_info(y, F32, [S, H])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, b.genuine


def check_properties(spec: Spec) -> None:
    model, genuine = build(spec)
    if currently_in_test_context():
        note(repr(spec))
    onnx.checker.check_model(model, full_check=True)
    result = lnfuse.optimize(model, rmsnorm=spec.kind == "rms")
    out, text = result.model, result.report.render_text(explain=True)
    onnx.checker.check_model(out, full_check=True)
    fused = sum(1 for n in iter_nodes(out.graph) if n.op_type == FUSED[spec.kind])
    other = sum(1 for n in iter_nodes(out.graph) if n.op_type in FUSED.values()) - fused
    assert other == 0, f"{other} norms of the other kind\n{text}"
    assert fused == genuine, f"{fused} LayerNormalization, {genuine} genuine norms\n{text}"
    x = (np.random.default_rng(spec.seed).standard_normal((S, H)) + 0.5).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        (a,), (c,) = run_ort(model, feed), run_ort(out, feed)
        assert float(np.max(np.abs(a - c))) <= 1e-4 * max(1.0, float(np.max(np.abs(a)))), text
    assert lnfuse.optimize(out, rmsnorm=spec.kind == "rms").changed is False


@_SETTINGS
@given(specs)
def test_norms_in_control_flow_bodies(spec: Spec) -> None:
    check_properties(spec)


def test_each_wrap_with_each_parameter_place() -> None:
    """Every body kind, alone and inside every other (one Scan at most: a row has no rows), with
    the parameters in each place."""
    for outer in WRAPS:
        for inner in ((), *((w,) for w in WRAPS if (outer, w) != ("scan", "scan"))):
            for params in PARAMS:
                for kind in KINDS:
                    check_properties(Spec((outer, *inner), kind, params, 2, None, seed=5))
