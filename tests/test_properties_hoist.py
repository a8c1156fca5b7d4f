"""Property-based tests for the LN-RNN hoist (``passes/rnn_hoist.py``): random unrolled recurrences.

A generator of its own builds ``h_t = tanh(LN(x_t @ W [+ b]) + h_{t-1} @ R)`` over the steps of a
sequence ``X`` (time-major ``[T, B, F]`` or batch-first ``[B, T, F]``), each step's LayerNorm
decomposed in the PyTorch form. Every knob is drawn: how a step is cut out of ``X`` (``Gather``
with a scalar or a one-element index, ``Slice``, one ``Split`` into all steps; the last three
followed by ``Squeeze``), ``MatMul`` or ``Gemm`` (``transB``, its ``C`` as the bias), a bias
``Add`` or none, the initial state a constant or a graph input, the order the steps are written
in. At most one near-miss is drawn, each of which must keep the steps it touches per step:
another weight, epsilon or gamma in one step, one step cut from a second sequence, a repeated
index, a missing step, a step's MatMul output that is also a graph output.

Properties of ``lnfuse.optimize``: the output passes ``check_model(full_check=True)``; its
outputs equal the original's on ONNX Runtime (``ORT_DISABLE_ALL``, within 1e-4 of
``max(1, |reference|)``); with no near-miss the T per-step norms become one hoisted
``LayerNormalization``; optimizing again changes nothing. ``LNFUSE_HYPOTHESIS_PROFILE=long`` runs
500 examples instead of 25.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from graph_builder import GraphBuilder, run_ort
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import lnfuse

_SETTINGS = settings(
    max_examples=500 if os.environ.get("LNFUSE_HYPOTHESIS_PROFILE") == "long" else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F32 = TensorProto.FLOAT
SLICERS = ("gather", "gather1", "slice", "split")
NEAR_MISSES = ("other_weight", "other_eps", "other_gamma", "other_input", "repeat", "gap", "extra_reader")


@dataclass(frozen=True)
class Spec:
    steps: int
    batch: int
    features: int
    hidden: int
    batch_first: bool
    slicer: str
    gemm: bool
    bias: bool
    h0_input: bool
    reverse: bool  # steps written last first (the recurrence still runs forward)
    near_miss: str | None
    which: int  # the step a near-miss touches
    seed: int


specs = st.builds(
    Spec,
    steps=st.integers(2, 4),
    batch=st.integers(1, 2),
    features=st.sampled_from([4, 6]),
    hidden=st.sampled_from([4, 5]),
    batch_first=st.booleans(),
    slicer=st.sampled_from(SLICERS),
    gemm=st.booleans(),
    bias=st.booleans(),
    h0_input=st.booleans(),
    reverse=st.booleans(),
    near_miss=st.one_of(st.none(), st.sampled_from(NEAR_MISSES)),
    which=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)


class _Builder(GraphBuilder):
    def __init__(self, spec: Spec) -> None:
        super().__init__(spec.seed)
        self.spec = spec

    def random(self, *shape: int, scale: float = 0.5, loc: float = 0.0) -> str:
        return self.const(loc + scale * self.rng.standard_normal(shape))


def _layernorm(b: _Builder, x: str, gamma: str, beta: str, eps: str) -> str:
    m = b.op("ReduceMean", [x], axes=[-1])[0]
    d = b.op("Sub", [x, m])[0]
    v = b.op("ReduceMean", [b.op("Pow", [d, b.const(2.0)])[0]], axes=[-1])[0]
    n = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [v, eps])[0]])[0]])[0]
    return b.op("Add", [b.op("Mul", [n, gamma])[0], beta])[0]


def _step_inputs(b: _Builder, spec: Spec, indices: list[int], sources: list[str]) -> list[str]:
    """x_t ([B, F]) for each step: its index in, and its source among, the sequences."""
    axis = 1 if spec.batch_first else 0
    if spec.slicer == "split" and len(set(sources)) == 1 and sorted(indices) == list(range(spec.steps)):
        parts = b.op("Split", [sources[0]], spec.steps, axis=axis)
        return [b.op("Squeeze", [parts[i], b.const([axis], np.int64)])[0] for i in indices]
    out = []
    for i, src in zip(indices, sources, strict=True):
        if spec.slicer == "gather":
            out.append(b.op("Gather", [src, b.const(i, np.int64)], axis=axis)[0])
            continue
        if spec.slicer == "gather1":
            piece = b.op("Gather", [src, b.const([i], np.int64)], axis=axis)[0]
        else:  # slice (and split when the steps are not all of one sequence)
            ends = b.const([i + 1], np.int64)
            piece = b.op("Slice", [src, b.const([i], np.int64), ends, b.const([axis], np.int64)])[0]
        out.append(b.op("Squeeze", [piece, b.const([axis], np.int64)])[0])
    return out


def _matmul(b: _Builder, spec: Spec, x: str, w: str, bias: str | None) -> str:
    """``x @ W [+ b]``: ``w`` names ``W`` (``W.T`` for a Gemm, which reads it with ``transB``)."""
    if spec.gemm:
        return b.op("Gemm", [x, w, *([bias] if bias else [])], transB=1)[0]
    m = b.op("MatMul", [x, w])[0]
    return b.op("Add", [m, bias])[0] if bias else m


def _weight(b: _Builder, spec: Spec) -> str:
    w = b.rng.standard_normal((spec.features, spec.hidden)) * 0.5
    return b.const(w.T if spec.gemm else w)


def build(spec: Spec) -> tuple[onnx.ModelProto, int]:
    """The model and how many of its steps must be hoisted into one norm (0: none must)."""
    b = _Builder(spec)
    T, B, F, H = spec.steps, spec.batch, spec.features, spec.hidden
    k, miss = spec.which % T, spec.near_miss
    indices = list(range(T))
    if miss == "repeat":
        indices[k] = indices[k - 1] if k else 1
    elif miss == "gap" and T > 2:
        indices[1] = T  # the sequence has T + 1 steps, one of them unused
    seq_len = T + 1 if miss == "gap" and T > 2 else T
    sources = ["X2" if miss == "other_input" and t == k else "X" for t in range(T)]
    order = list(range(T))[::-1] if spec.reverse else list(range(T))
    xs = dict(
        zip(
            order,
            _step_inputs(b, spec, [indices[t] for t in order], [sources[t] for t in order]),
            strict=True,
        )
    )
    w = _weight(b, spec)
    w2 = _weight(b, spec) if miss == "other_weight" else w
    bias = b.random(H, scale=0.1) if spec.bias else None
    gamma, beta, eps = b.random(H, scale=0.2, loc=1.0), b.random(H, scale=0.1), b.const(1e-5)
    gamma2 = b.random(H, scale=0.2, loc=1.0) if miss == "other_gamma" else gamma
    eps2 = b.const(1e-3) if miss == "other_eps" else eps
    r = b.random(H, H, scale=0.3)
    extra: list[str] = []
    h = "h0" if spec.h0_input else b.const(np.zeros((B, H)))
    for t in range(T):
        m = _matmul(b, spec, xs[t], w2 if t == k else w, bias)
        if miss == "extra_reader" and t == k:
            extra.append(m)
        u = _layernorm(b, m, gamma2 if t == k else gamma, beta, eps2 if t == k else eps)
        h = b.op("Tanh", [b.op("Add", [u, b.op("MatMul", [h, r])[0]])[0]])[0]
    shape = [B, seq_len, F] if spec.batch_first else [seq_len, B, F]
    inputs = [
        helper.make_tensor_value_info(n, F32, shape)
        for n in ("X", *(("X2",) if miss == "other_input" else ()))
    ]
    if spec.h0_input:
        inputs.append(helper.make_tensor_value_info("h0", F32, [B, H]))
    outputs = [helper.make_tensor_value_info(n, F32, [B, H]) for n in (h, *extra)]
    graph = helper.make_graph(b.nodes, "rnn", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, (T if miss is None or (miss == "gap" and T == 2) else 0)


def check_properties(spec: Spec) -> None:
    model, hoisted = build(spec)
    if currently_in_test_context():
        note(repr(spec))
    onnx.checker.check_model(model, full_check=True)
    result = lnfuse.optimize(model)
    out, text = result.model, result.report.render_text(explain=True)
    onnx.checker.check_model(out, full_check=True)
    n_ln = [n.op_type for n in out.graph.node].count("LayerNormalization")
    if hoisted:
        assert n_ln == 1, f"{n_ln} LayerNormalization for {hoisted} steps that share everything\n{text}"
    rng = np.random.default_rng(spec.seed)
    feed = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.graph.input
    }
    for a, c in zip(run_ort(model, feed), run_ort(out, feed), strict=True):
        assert a.shape == c.shape
        assert float(np.max(np.abs(a - c))) <= 1e-4 * max(1.0, float(np.max(np.abs(a)))), text
    assert lnfuse.optimize(out).changed is False


@_SETTINGS
@given(specs)
def test_hoisted_recurrences_compute_the_same(spec: Spec) -> None:
    check_properties(spec)


def test_each_near_miss_with_each_slicer() -> None:
    """Every near-miss, and none, with every way of cutting the steps, on a three-step sequence."""
    for slicer in SLICERS:
        for miss in (None, *NEAR_MISSES):
            spec = Spec(
                3, 2, 4, 5, slicer == "slice", slicer, slicer == "gather", True, False, False, miss, 1, 11
            )
            check_properties(spec)
