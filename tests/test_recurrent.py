"""Recurrent and control-flow models: fusion, recurrence grouping, and the input-side LN hoist.

Exported fixtures (``models.recurrent.EXPORTED``, no PyTorch needed): after
``lnfuse.optimize`` no decomposed LN is left, the output passes the full checker,
and it computes the same as the original (ONNX Runtime CPU, ``ORT_DISABLE_ALL``,
seeded inputs; the ``If`` model with ``cond`` True and False).

Counting LNs after optimization ("LN instances"): a ``LayerNormalization`` node
counts once, except a *hoisted* one (every consumer of its output is a ``Gather``
along a non-feature axis, one per time step), which counts once per such ``Gather``:
each of them is the output of one original per-step LN. So the instance count of an
optimized model equals the fixture's ``expect_ln`` whether or not hoisting fired.

Hoisting (``passes/rnn_hoist.py``): synthetic LN-RNNs built with ``onnx.helper``
(step slices by Gather / Slice / Split / Squeeze, time-major and batch-first,
static and symbolic T, MatMul / Gemm, bias Add, Identity weight aliases) and
near-misses where the rewrite must not fire (different weights, a different eps
in one step, a per-step MatMul output with another consumer, slices of two
different inputs, non-contiguous steps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lnfuse
from lnfuse.pipeline import PassContext
from lnfuse.protos import iter_graphs
from lnfuse.report import Report
from models.recurrent import (
    EXPORTED,
    OUT_DIR,
    ExportedCase,
    count_decomposed_ln,
    count_ops,
    decomposed_ln,
    fixture_feeds,
)

RTOL = 1e-5


# Rounding differences between the decomposed and the fused norm are carried through the
# recurrence; over long unrolls they grow with the number of steps (T=32 on onnxruntime 1.21-1.2x:
# 1.14e-5), so the tolerance does too: RTOL up to 16 steps, RTOL * T / 16 beyond.
def _rtol(case: ExportedCase) -> float:
    return RTOL * max(1.0, (case.steps or 0) / 16)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _is_hoisted(
    graph: onnx.GraphProto, ln: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
) -> bool:
    users = consumers.get(ln.output[0], [])
    graph_outputs = {o.name for o in graph.output}
    return (
        bool(users)
        and ln.output[0] not in graph_outputs
        and all(u.op_type == "Gather" and u.input[0] == ln.output[0] for u in users)
    )


def ln_instances(model: onnx.ModelProto) -> int:
    """LayerNorm instances: LN nodes, a hoisted LN counting once per per-step Gather of its output."""
    total = 0
    for g in iter_graphs(model.graph):
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        for n in g.node:
            if n.op_type != "LayerNormalization":
                continue
            total += len(consumers[n.output[0]]) if _is_hoisted(g, n, consumers) else 1
    return total


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_same(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    rtol: float = RTOL,
) -> None:
    """Same outputs (max abs error <= rtol relative to the reference's magnitude) on seeded inputs."""
    for feed in fixture_feeds(a, seed, dims):
        for ra, rb in zip(_run(a, feed), _run(b, feed), strict=True):
            assert ra.shape == rb.shape
            scale = max(1.0, float(np.max(np.abs(ra)))) if ra.size else 1.0
            err = float(np.max(np.abs(ra.astype(np.float64) - rb.astype(np.float64)))) if ra.size else 0.0
            assert err <= rtol * scale, f"max abs error {err} (scale {scale})"


def _path(case: ExportedCase) -> Path:
    return OUT_DIR / f"{case.name}.onnx"


def _op_count(model: onnx.ModelProto, op: str) -> int:
    return count_ops(model, op)


# ----------------------------------------------------------------------------
# Exported fixtures
# ----------------------------------------------------------------------------

# Mixed-precision exports (fp16 inside, fp32 out) are compared at their inner type's tolerance
# by tests/test_precision.py; assert_same here is the fp32 bound.
_CASES = [pytest.param(c, id=c.name) for c in EXPORTED if not c.mixed_precision]
_cache: dict[tuple[str, bool], lnfuse.OptimizeResult] = {}


def _optimized(case: ExportedCase, hoist: bool = True):  # type: ignore[no-untyped-def]
    key = (case.name, hoist)
    if key not in _cache:
        _cache[key] = lnfuse.optimize(_path(case), hoist=hoist)
    return _cache[key]


@pytest.mark.parametrize("case", _CASES)
def test_exported_fully_fused_and_equal(case: ExportedCase) -> None:
    original = onnx.load(_path(case))
    res = _optimized(case)
    out = res.model
    assert res.changed
    assert count_decomposed_ln(out) == 0
    assert ln_instances(out) == case.expect_ln
    assert len(res.report.matches) == case.expect_ln
    onnx.checker.check_model(out, full_check=True)
    assert_same(original, out, seed=7, rtol=_rtol(case))


@pytest.mark.parametrize("c", [c for c in EXPORTED if c.steps], ids=lambda c: c.name)
def test_exported_unrolled_hoist_off_keeps_one_ln_per_step(c: ExportedCase) -> None:
    res = _optimized(c, hoist=False)
    assert res.report.hoisted == []
    assert "rnn-hoist" not in res.report.passes
    assert _op_count(res.model, "LayerNormalization") == c.expect_ln
    assert ln_instances(res.model) == c.expect_ln
    assert_same(onnx.load(_path(c)), res.model, seed=3, rtol=_rtol(c))


@pytest.mark.parametrize("case", [c for c in EXPORTED if c.steps], ids=lambda c: c.name)
def test_exported_unrolled_groups(case: ExportedCase) -> None:
    report = _optimized(case).report
    assert len(report.groups) == 1
    group = report.groups[0]
    assert f"{case.ln_per_step} LN(s) per step x T={case.steps} steps" in group.description
    assert group.count == case.expect_ln
    assert group.graph == "main"
    kind = "LN-LSTM-like" if case.ln_per_step == 3 else "LN-GRU/RNN-like"
    assert group.description.startswith(kind)


@pytest.mark.parametrize("case", [c for c in EXPORTED if c.steps], ids=lambda c: c.name)
def test_exported_unrolled_hoists_input_side_ln(case: ExportedCase) -> None:
    original = onnx.load(_path(case))
    res = _optimized(case)
    steps = case.steps
    assert steps is not None
    # Exactly one input-side LN per cell (LN(W_x x_t)) is hoisted: T LNs and T MatMuls -> 1 + 1.
    assert len(res.report.hoisted) == 1
    line = res.report.hoisted[0]
    assert f"hoisted over {steps} steps of 'x'" in line
    assert f"({steps} MatMul + {steps} LayerNormalization -> 1 + 1)" in line
    assert _op_count(res.model, "LayerNormalization") == case.expect_ln - (steps - 1)
    assert _op_count(res.model, "MatMul") == _op_count(original, "MatMul") - (steps - 1)
    # The per-step weight aliases of W_x died with their MatMuls; W_h's are still used.
    assert _op_count(res.model, "Identity") == _op_count(original, "Identity") - (steps - 1)
    assert f"hoisted: {line}" in res.report.render_text()


@pytest.mark.parametrize("case", _CASES)
def test_exported_second_run_is_noop(case: ExportedCase) -> None:
    out = _optimized(case).model
    again = lnfuse.optimize(out)
    assert not again.changed
    assert again.model is out
    assert again.report.matches == [] and again.report.hoisted == []


# -- control flow --------------------------------------------------------------

_CONTROL_FLOW = {
    "ln_lstm_scripted_loop": "Loop",
    "ln_lstm_loop": "Loop",
    "ln_lstm_loop_inner_params": "Loop",
    "ln_gru_scan": "Scan",
    "if_ln_both_branches": "If",
    "nested_loop_if_ln": "Loop",
}


@pytest.mark.parametrize("name", sorted(_CONTROL_FLOW))
def test_control_flow_lns_live_in_bodies(name: str) -> None:
    case = next(c for c in EXPORTED if c.name == name)
    out = _optimized(case).model
    main_lns = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    assert main_lns == []
    assert _op_count(out, "LayerNormalization") == case.expect_ln
    assert any(n.op_type == _CONTROL_FLOW[name] for n in out.graph.node)
    for m in _optimized(case).report.matches:
        assert m.graph != "main" and ":" in m.graph
    assert _optimized(case).report.hoisted == []


def test_outer_scope_gamma_beta_are_reused() -> None:
    """Gain/bias of the LNs in the Loop body are the original outer-scope tensors (same names, same values).

    (Where the initializer ends up after export, outer graph or body, is onnx-graphsurgeon's choice.)
    """
    case = next(c for c in EXPORTED if c.name == "ln_lstm_loop")
    original = onnx.load(_path(case))
    before = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    out = _optimized(case).model
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    after = {i.name: numpy_helper.to_array(i) for g in iter_graphs(out.graph) for i in g.initializer}
    lns = [n for n in body.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 3
    names = set()
    for ln in lns:
        for name in ln.input[1:]:
            assert name in before, name  # an outer initializer of the original, not a copy
            np.testing.assert_array_equal(after[name], before[name])
            names.add(name)
    assert names == {f"cell.ln_{k}.{p}" for k in "xhc" for p in ("weight", "bias")}


def test_nested_loop_if_ln_two_scopes_down() -> None:
    case = next(c for c in EXPORTED if c.name == "nested_loop_if_ln")
    res = _optimized(case)
    assert len(res.report.matches) == 1
    assert res.report.matches[0].graph.count(":") == 2  # main/Loop:body/If:then_branch


# ----------------------------------------------------------------------------
# Synthetic LN-RNNs for the hoist
# ----------------------------------------------------------------------------

B, IN, HID = 3, 5, 8


def build_rnn(
    T: int = 6,
    *,
    slicer: str = "gather",
    batch_first: bool = False,
    symbolic_t: bool = False,
    steps: list[int] | None = None,
    weights: str = "alias",  # shared | alias | distinct
    gemm: bool = False,
    add_bias: bool = False,
    eps_per_step: dict[int, float] | None = None,
    extra_consumer_step: int | None = None,
    second_input_from: int | None = None,
    negative_index: bool = False,
    decomposed: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """An LN tanh-RNN ``h = tanh(LN(x_t W [+ b]) + h U)`` unrolled over ``steps`` (default 0..T-1).

    ``slicer``: gather | gather1d (index [t], keeps the axis) | slice (keeps the axis) |
    slice_squeeze | split_squeeze. ``decomposed`` writes PyTorch's LN chain (opset 14),
    otherwise ``LayerNormalization`` (opset 17). ``second_input_from=k``: steps >= k slice
    a second input ``x2``.
    """
    rng = np.random.default_rng(seed)
    steps = list(range(T)) if steps is None else steps
    ta = 1 if batch_first else 0
    t_dim: int | str = "T" if symbolic_t else T
    x_shape = [B, t_dim, IN] if batch_first else [t_dim, B, IN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if second_input_from is not None:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, x_shape))
    keep = slicer in ("gather1d", "slice")
    h_shape = ([B, 1, HID] if batch_first else [1, B, HID]) if keep else [B, HID]
    w_x = (0.4 * rng.standard_normal((IN, HID))).astype(np.float32)
    inits = [
        numpy_helper.from_array(w_x, "W"),
        numpy_helper.from_array(np.ascontiguousarray(w_x.T), "W_T"),
        numpy_helper.from_array((0.4 * rng.standard_normal((HID, HID))).astype(np.float32), "U"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HID)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(HID)).astype(np.float32), "beta"),
        numpy_helper.from_array((0.1 * rng.standard_normal(HID)).astype(np.float32), "b"),
        numpy_helper.from_array(np.zeros(h_shape, np.float32), "h_init"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    nodes: list[onnx.NodeProto] = []
    if slicer == "split_squeeze":
        for src in ("x", "x2") if second_input_from is not None else ("x",):
            nodes.append(
                helper.make_node(
                    "Split",
                    [src, "split_ones"],
                    [f"{src}_piece{t}" for t in range(T)],
                    name=f"Split_{src}",
                    axis=ta,
                )
            )
        inits.append(numpy_helper.from_array(np.ones(T, np.int64), "split_ones"))
    h = "h_init"
    outputs = []
    for t in steps:
        src = "x2" if second_input_from is not None and t >= second_input_from else "x"
        xt = f"x_t{t}"
        idx = t - T if negative_index else t
        if slicer in ("gather", "gather1d", "gather1d_squeeze"):
            value = np.array(idx if slicer == "gather" else [idx], np.int64)
            nodes.append(helper.make_node("Constant", [], [f"idx{t}"], value=numpy_helper.from_array(value)))
            out = f"x_cut{t}" if slicer == "gather1d_squeeze" else xt
            nodes.append(helper.make_node("Gather", [src, f"idx{t}"], [out], name=f"Gather{t}", axis=ta))
            if slicer == "gather1d_squeeze":
                nodes.append(helper.make_node("Squeeze", [out, "sq_axes"], [xt], name=f"Squeeze{t}"))
        elif slicer in ("slice", "slice_squeeze"):
            for nm, v in (("s", idx), ("e", idx + 1 if idx != -1 else 2**62), ("a", ta)):
                inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{nm}{t}"))
            out = xt if slicer == "slice" else f"x_cut{t}"
            nodes.append(helper.make_node("Slice", [src, f"s{t}", f"e{t}", f"a{t}"], [out], name=f"Slice{t}"))
            if slicer == "slice_squeeze":
                nodes.append(helper.make_node("Squeeze", [out, "sq_axes"], [xt], name=f"Squeeze{t}"))
        elif slicer == "split_squeeze":
            nodes.append(
                helper.make_node("Squeeze", [f"{src}_piece{t}", "sq_axes"], [xt], name=f"Squeeze{t}")
            )
        else:
            raise ValueError(slicer)
        w = "W_T" if gemm else "W"
        if weights == "alias":
            nodes.append(helper.make_node("Identity", [w], [f"W_alias{t}"], name=f"Identity{t}"))
            w = f"W_alias{t}"
        elif weights == "distinct":
            w = f"W{t}"
            wv = (0.4 * rng.standard_normal((IN, HID))).astype(np.float32)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(wv.T) if gemm else wv, w))
        mm = f"mm{t}"
        if gemm:  # Gemm(x_t, W^T, b, transB=1): torch's nn.Linear on a 2-D input
            nodes.append(helper.make_node("Gemm", [xt, w, "b"], [mm], name=f"Gemm{t}", transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [xt, w], [mm], name=f"MatMul{t}"))
        pre = mm
        if add_bias:
            pre = f"mmb{t}"
            nodes.append(helper.make_node("Add", ["b", mm], [pre], name=f"AddBias{t}"))
        eps = (eps_per_step or {}).get(t, 1e-5)
        ln = f"ln{t}"
        if decomposed:
            eps_name = f"eps{t}"
            inits.append(numpy_helper.from_array(np.array(eps, np.float32), eps_name))
            nodes += decomposed_ln(pre, ln, f"ln_x{t}", "gamma", "beta", eps_name, "two")
        else:
            nodes.append(
                helper.make_node(
                    "LayerNormalization", [pre, "gamma", "beta"], [ln], name=f"LN{t}", axis=-1, epsilon=eps
                )
            )
        if extra_consumer_step == t:
            nodes.append(helper.make_node("Relu", [mm], [f"relu{t}"], name=f"Relu{t}"))
            outputs.append(helper.make_tensor_value_info(f"relu{t}", TensorProto.FLOAT, h_shape))
        nodes.append(helper.make_node("MatMul", [h, "U"], [f"hu{t}"], name=f"MatMulU{t}"))
        nodes.append(helper.make_node("Add", [ln, f"hu{t}"], [f"pre{t}"], name=f"AddH{t}"))
        nodes.append(helper.make_node("Tanh", [f"pre{t}"], [f"h{t}"], name=f"Tanh{t}"))
        h = f"h{t}"
    if slicer in ("slice_squeeze", "split_squeeze", "gather1d_squeeze"):
        inits.append(numpy_helper.from_array(np.array([ta], np.int64), "sq_axes"))
    graph = helper.make_graph(
        nodes,
        "ln_rnn",
        inputs,
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, h_shape), *outputs],
        inits,
    )
    opset = 14 if decomposed else 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _hoist_check(
    model: onnx.ModelProto, n_steps: int, *, dims: dict[str, int] | None = None
) -> lnfuse.OptimizeResult:
    """Hoisting fired once over ``n_steps`` steps; equal numerics; hoist=False keeps one LN per step."""
    res = lnfuse.optimize(model)
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert len(res.report.hoisted) == 1, res.report.hoisted
    assert f"hoisted over {n_steps} steps of 'x'" in res.report.hoisted[0]
    assert _op_count(out, "LayerNormalization") == 1
    assert ln_instances(out) == n_steps
    assert _op_count(out, "MatMul") + _op_count(out, "Gemm") == n_steps + 1  # the h @ U ones stay
    assert_same(model, out, seed=11, dims=dims)
    off = lnfuse.optimize(model, hoist=False)
    assert off.report.hoisted == []
    assert _op_count(off.model, "LayerNormalization") == n_steps
    again = lnfuse.optimize(out)
    assert not again.changed and again.model is out
    return res


@pytest.mark.parametrize(
    "slicer", ["gather", "gather1d", "gather1d_squeeze", "slice", "slice_squeeze", "split_squeeze"]
)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_hoist_slicing_forms(slicer: str, batch_first: bool) -> None:
    model = build_rnn(6, slicer=slicer, batch_first=batch_first)
    res = _hoist_check(model, 6)
    # Dead per-step slices and weight aliases are removed with the MatMuls.
    assert _op_count(res.model, "Identity") == 0
    assert _op_count(res.model, "Squeeze") == 0 and _op_count(res.model, "Split") == 0
    assert _op_count(res.model, "Slice") == 0  # full range: no prefix slice


def test_hoist_decomposed_through_the_whole_pipeline() -> None:
    model = build_rnn(5, decomposed=True)
    res = _hoist_check(model, 5)
    assert len(res.report.matches) == 5
    assert res.report.opset_after == 17
    assert count_decomposed_ln(res.model) == 0


@pytest.mark.parametrize("weights", ["shared", "alias"])
def test_hoist_shared_weight_or_identity_alias(weights: str) -> None:
    res = _hoist_check(build_rnn(4, weights=weights), 4)
    assert "of W 'W' hoisted over 4 steps" in res.report.hoisted[0]


def test_hoist_with_bias_add() -> None:
    res = _hoist_check(build_rnn(5, add_bias=True), 5)
    assert "(5 MatMul + 5 Add + 5 LayerNormalization -> 1 + 1 + 1)" in res.report.hoisted[0]
    assert _op_count(res.model, "Add") == 5 + 1  # AddH per step + the hoisted bias Add


@pytest.mark.parametrize("weights", ["shared", "alias"])
def test_hoist_gemm_transb_with_bias(weights: str) -> None:
    res = _hoist_check(build_rnn(4, gemm=True, weights=weights), 4)
    assert "of W 'W_T' hoisted" in res.report.hoisted[0]
    assert "(4 Gemm + 4 LayerNormalization -> 1 + 1)" in res.report.hoisted[0]
    assert _op_count(res.model, "Gemm") == 0


def test_hoist_negative_indices_static_t() -> None:
    _hoist_check(build_rnn(5, negative_index=True), 5)
    _hoist_check(build_rnn(5, slicer="slice_squeeze", negative_index=True), 5)


def test_hoist_partial_range_slices_the_sequence_first() -> None:
    model = build_rnn(8, steps=[2, 3, 4, 5])
    res = _hoist_check(model, 4)
    assert _op_count(res.model, "Slice") == 1  # X[2:6] along time, then one MatMul + one LN


def test_hoist_symbolic_t_gather() -> None:
    model = build_rnn(6, symbolic_t=True)
    res = _hoist_check(model, 6, dims={"T": 6})
    assert _op_count(res.model, "Slice") == 1  # X[0:6]: T is not known to be 6
    # A longer sequence: the unused tail is ignored by both; a shorter one fails in both.
    assert_same(model, res.model, seed=2, dims={"T": 9})
    feed = fixture_feeds(model, 0, {"T": 4})[0]
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own error types
        _run(model, feed)
    with pytest.raises(Exception):  # noqa: B017
        _run(res.model, feed)


def test_hoist_symbolic_t_slice_is_not_hoisted() -> None:
    # Slice clamps at run time (an empty step instead of an error): only exact with static T.
    model = build_rnn(4, symbolic_t=True, slicer="slice_squeeze")
    res = lnfuse.optimize(model)
    assert res.report.hoisted == []
    assert _op_count(res.model, "LayerNormalization") == 4


def test_pass_switch() -> None:
    from lnfuse.passes import DEFAULT_PASSES
    from lnfuse.passes.layer_norm import LayerNormPass
    from lnfuse.passes.rms_norm import RMSNormPass
    from lnfuse.passes.rnn_hoist import RnnHoistPass

    assert DEFAULT_PASSES.index(RnnHoistPass) > DEFAULT_PASSES.index(LayerNormPass)
    assert DEFAULT_PASSES.index(RnnHoistPass) > DEFAULT_PASSES.index(RMSNormPass)
    assert RnnHoistPass().enabled(PassContext(report=Report(), hoist=True))
    assert not RnnHoistPass().enabled(PassContext(report=Report(), hoist=False))


# -- near-misses: must not fire ------------------------------------------------------


_NEAR_MISSES = {
    "different_weights": {"weights": "distinct"},
    "different_eps_in_one_step": {"eps_per_step": {3: 1e-3}},
    "matmul_output_has_another_consumer": {"extra_consumer_step": 2},
    "two_different_inputs": {"second_input_from": 3},
    "non_contiguous_steps": {"steps": [0, 2, 4, 6], "T": 8},
    "single_step": {"steps": [3]},
}


@pytest.mark.parametrize("name", sorted(_NEAR_MISSES))
@pytest.mark.parametrize("decomposed", [False, True], ids=["fused", "decomposed"])
def test_hoist_near_miss_keeps_every_step(name: str, decomposed: bool) -> None:
    kwargs = dict(_NEAR_MISSES[name])
    T = kwargs.pop("T", 6)
    model = build_rnn(T, decomposed=decomposed, **kwargs)
    n_steps = len(kwargs.get("steps", range(T)))
    res = lnfuse.optimize(model)
    assert res.report.hoisted == []
    onnx.checker.check_model(res.model, full_check=True)
    assert _op_count(res.model, "LayerNormalization") == n_steps
    assert ln_instances(res.model) == n_steps
    assert_same(model, res.model, seed=13)


def test_hoist_ln_mean_output_used_is_not_hoisted() -> None:
    model = build_rnn(4)
    for n in model.graph.node:
        if n.name == "LN1":
            n.output.append("ln1_mean")
    model.graph.output.append(helper.make_tensor_value_info("ln1_mean", TensorProto.FLOAT, [B, 1]))
    onnx.checker.check_model(model, full_check=True)
    res = lnfuse.optimize(model)
    assert res.report.hoisted == []
    assert not res.changed


def test_hoist_two_weight_groups_sharing_the_step_slice() -> None:
    """Two input-side LNs (e.g. two gates) read the same Gather of x_t: both hoist, the Gather dies once."""
    model = build_rnn(4, weights="shared")
    g = model.graph
    rng = np.random.default_rng(3)
    g.initializer.append(
        numpy_helper.from_array((0.4 * rng.standard_normal((IN, HID))).astype(np.float32), "W2")
    )
    extra = []
    for t in range(4):
        extra += [
            helper.make_node("MatMul", [f"x_t{t}", "W2"], [f"mm2_{t}"], name=f"MatMulW2_{t}"),
            helper.make_node(
                "LayerNormalization", [f"mm2_{t}", "gamma", "beta"], [f"ln2_{t}"], axis=-1, epsilon=1e-6
            ),
            helper.make_node("Add", [f"ln2_{t}", f"h{t}"], [f"z{t}"], name=f"AddZ{t}"),
        ]
    g.node.extend(extra)
    for t in (3, 1, 0, 2):  # graph outputs in any order
        g.output.append(helper.make_tensor_value_info(f"z{t}", TensorProto.FLOAT, [B, HID]))
    onnx.checker.check_model(model, full_check=True)
    res = lnfuse.optimize(model)
    assert len(res.report.hoisted) == 2
    assert _op_count(res.model, "LayerNormalization") == 2
    assert ln_instances(res.model) == 8
    assert _op_count(res.model, "Gather") == 8  # 2 x 4 per-step slices of Z; the x_t Gathers are gone
    onnx.checker.check_model(res.model, full_check=True)
    assert_same(model, res.model, seed=17)


def test_hoist_step_ln_output_that_is_a_graph_output() -> None:
    model = build_rnn(4)
    model.graph.output.append(helper.make_tensor_value_info("ln2", TensorProto.FLOAT, [B, HID]))
    onnx.checker.check_model(model, full_check=True)
    res = _hoist_check(model, 4)
    producer = next(n for n in res.model.graph.node if "ln2" in n.output)
    assert producer.op_type == "Gather"


def test_hoist_repeated_index_is_not_hoisted() -> None:
    model = build_rnn(4)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == "idx3":
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(2, np.int64)))
    onnx.checker.check_model(model, full_check=True)
    res = lnfuse.optimize(model)
    assert res.report.hoisted == []
    assert not res.changed


def test_hoist_ln_not_over_last_axis_is_not_hoisted() -> None:
    model = build_rnn(4, slicer="gather1d")  # steps are [1, B, H]: LN over the last two axes
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.ones((B, HID), np.float32), "gamma2"))
    g.initializer.append(numpy_helper.from_array(np.zeros((B, HID), np.float32), "beta2"))
    for n in g.node:
        if n.op_type == "LayerNormalization":
            n.input[1], n.input[2] = "gamma2", "beta2"
            for a in n.attribute:
                if a.name == "axis":
                    a.i = -2
    onnx.checker.check_model(model, full_check=True)
    res = lnfuse.optimize(model)
    assert res.report.hoisted == []
    assert not res.changed


@pytest.mark.parametrize("slices_outside", [False, True], ids=["slices_in_branch", "slices_in_main"])
def test_hoist_inside_if_branch(slices_outside: bool) -> None:
    """An unrolled RNN inside an If branch: hoisted there; outer-scope x (and x_t) handled."""
    inner = build_rnn(4, weights="alias")
    body_nodes = list(inner.graph.node)
    outer_nodes: list[onnx.NodeProto] = []
    if slices_outside:  # the Gathers (and their index Constants) move to the main graph
        outer_nodes = [n for n in body_nodes if n.op_type in ("Gather", "Constant")]
        body_nodes = [n for n in body_nodes if n.op_type not in ("Gather", "Constant")]
    then_g = helper.make_graph(
        body_nodes, "then", [], [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [B, HID])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h_init"], ["h_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("h_else", TensorProto.FLOAT, [B, HID])],
    )
    graph = helper.make_graph(
        [*outer_nodes, helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        "if_rnn",
        [*inner.graph.input, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, HID])],
        list(inner.graph.initializer),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    res = lnfuse.optimize(model)
    assert len(res.report.hoisted) == 1
    assert "hoisted over 4 steps of 'x' in main/" in res.report.hoisted[0]
    onnx.checker.check_model(res.model, full_check=True)
    assert _op_count(res.model, "LayerNormalization") == 1
    assert ln_instances(res.model) == 4
    assert _op_count(res.model, "Identity") == 1  # the else branch's; the W aliases are gone
    assert sum(1 for n in res.model.graph.node if n.op_type == "Gather") == 0  # dead outer slices removed
    assert_same(model, res.model, seed=19)


def test_bench_rnn_model_is_hoisted() -> None:
    """The benchmark's LN-LSTM (small here) gets fused, hoisted, and stays equal."""
    from benchmarks.bench_rnn import build_ln_lstm, variants

    model = build_ln_lstm(steps=5, batch=2, hidden=8, inputs=6)
    models, hoisted = variants(model)
    assert len(hoisted) == 1 and "hoisted over 5 steps of 'x'" in hoisted[0]
    assert _op_count(models["fused"], "LayerNormalization") == 15
    assert _op_count(models["hoisted"], "LayerNormalization") == 11
    assert ln_instances(models["hoisted"]) == 15
    assert_same(model, models["fused"], seed=23)
    assert_same(model, models["hoisted"], seed=23)


def test_hoist_refusal_is_explained() -> None:
    # One eps differs in one step: the steps are not one shared LN, and --explain says so.
    res = lnfuse.optimize(build_rnn(6, eps_per_step={3: 1e-3}))
    assert res.report.hoisted == []
    assert any("not hoisted" in h and "differ" in h for h in res.report.hoist_refusals)
    assert "not hoisted" in res.report.render_text(explain=True)
