"""The LayerNorm / RMSNorm passes over every fixture form and look-alike.

For each positive case: the optimized model holds exactly the expected number of
fused ops and no decomposed statistics, passes the full checker, keeps its graph
inputs/outputs, matches the original at ORT_DISABLE_ALL within the dtype
tolerance (fp32 1e-5 relative to the output's scale), and a second run changes
nothing. For each look-alike: the op list is unchanged and --explain has a reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lnfuse
from lnfuse.protos import iter_nodes
from models import patterns

TP = onnx.TensorProto
RTOL = {TP.FLOAT: 1e-5, TP.DOUBLE: 1e-7, TP.FLOAT16: 1e-2}  # fp64: the eps attribute is float32
DECOMPOSED = ("ReduceMean", "Sqrt", "Reciprocal", "ReduceSum")


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in iter_nodes(model.graph))


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(ref: np.ndarray, got: np.ndarray, rtol: float) -> None:
    assert ref.shape == got.shape and ref.dtype == got.dtype
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    scale = max(float(np.max(np.abs(r))), 1.0)
    err = float(np.max(np.abs(r - g)))
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def elem_type(model: onnx.ModelProto, name: str) -> int:
    for vi in model.graph.output:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    raise KeyError(name)


@pytest.mark.parametrize("case", patterns.POSITIVE, ids=lambda c: c.name)
def test_positive_case_is_fused_exactly(case: patterns.Case) -> None:
    if case.expect_rms and onnx.defs.onnx_opset_version() < 23:
        pytest.skip(f"RMSNormalization needs opset 23; onnx {onnx.__version__} has none")
    model = case.build()
    before = op_counts(model)
    result = lnfuse.optimize(model, **dict(case.options))
    out = result.model
    counts = op_counts(out)
    assert counts["LayerNormalization"] == case.expect_ln
    assert counts["RMSNormalization"] == case.expect_rms
    assert result.changed
    # No decomposed statistics are left behind (these cases hold norms only).
    for op in DECOMPOSED:
        assert counts[op] == 0, f"{op} left: {dict(counts)} (was {dict(before)})"
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [o.type for o in out.graph.output] == [o.type for o in model.graph.output]
    need = 23 if case.expect_rms else 17
    assert lnfuse.opset.default_opset(out) >= need
    assert out.ir_version <= 11
    for seed in (0, 1):
        feeds = {"x": patterns.make_input(model, seed=seed)}
        for ref, got in zip(run(model, feeds), run(out, feeds), strict=False):
            dt = elem_type(model, model.graph.output[0].name)
            rtol = max(case.rtol or 0.0, RTOL.get(dt, 1e-5))
            assert_close(ref, got, rtol)
    again = lnfuse.optimize(out, **dict(case.options))
    assert not again.changed
    assert again.model is out


@pytest.mark.parametrize("case", patterns.NEGATIVE, ids=lambda c: c.name)
def test_lookalike_is_left_unchanged(case: patterns.Case) -> None:
    model = case.build()
    result = lnfuse.optimize(model, **dict(case.options))
    assert not result.changed
    assert result.model is model
    assert op_counts(result.model) == op_counts(model)
    assert not result.report.matches


REASONS = {
    "neg_sub_reversed": "mean - x",
    "neg_div_reversed": "divisor",
    "neg_pow3": "Pow exponent 3",
    "neg_reducesum_var": "ReduceSum",
    "neg_eps_outside_sqrt": "divisor",
    "neg_axes_mismatch": "axes",
    "neg_nontrailing_stats_gamma_last": "not normalized",
    "neg_keepdims0": "keepdims=0",
    "neg_gamma_broadcast_batch": "not normalized",
    "neg_mean_consumed_outside": "outside the match",
    "neg_centered_is_graph_output": "graph output",
    "neg_variance_consumed_outside": "outside the match",
    "neg_batchnorm_like": "not normalized",
    "neg_instancenorm_like": "not normalized",
    "neg_groupnorm_like": "GroupNorm",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_lookalike_refusal_says_why(name: str) -> None:
    result = lnfuse.optimize(patterns.ALL[name].build())
    reasons = " | ".join(r.reason for r in result.report.refusals)
    assert REASONS[name] in reasons, reasons
    assert "refused" in result.report.render_text(explain=True)


def test_epsilon_and_axis_are_exact() -> None:
    result = lnfuse.optimize(patterns.ALL["eps_weird"].build())
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ln.attribute}
    assert attrs["epsilon"] == np.float32(1.234567e-7)
    assert attrs["axis"] == -1
    assert attrs["stash_type"] == 1


def test_positive_axes_keep_positive_axis() -> None:
    result = lnfuse.optimize(patterns.ALL["positive_axes_static"].build())
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    axis = next(a.i for a in ln.attribute if a.name == "axis")
    assert axis == 2


def test_two_trailing_axes_scale_has_normalized_shape() -> None:
    result = lnfuse.optimize(patterns.ALL["two_trailing_axes"].build())
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    inits = {i.name: i for i in result.model.graph.initializer}
    scale = inits[ln.input[1]]
    assert len(scale.dims) == 2
    assert next(a.i for a in ln.attribute if a.name == "axis") == -2


def test_no_affine_emits_ones_scale() -> None:
    result = lnfuse.optimize(patterns.ALL["no_affine"].build())
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert np.all(inits[ln.input[1]] == 1.0)
    assert len(ln.input) == 2


def test_fp16_island_reads_fp16_directly() -> None:
    result = lnfuse.optimize(patterns.ALL["cast_island_fp16"].build())
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["LayerNormalization"]
    ln = result.model.graph.node[0]
    assert next(a.i for a in ln.attribute if a.name == "stash_type") == 1


def test_float64_statistics_are_left_unfused_with_a_reason() -> None:
    """stash_type may only be float/bfloat16: a double LN has no standard, exact fused form."""
    model = patterns.ALL["neg_float64_statistics"].build()
    result = lnfuse.optimize(model)
    assert not result.changed and result.model is model
    (refusal,) = result.report.refusals
    assert "float64 statistics" in refusal.reason


def test_channels_first_adds_transposes_and_says_so() -> None:
    result = lnfuse.optimize(patterns.ALL["channels_first_ln"].build())
    assert [n.op_type for n in result.model.graph.node] == ["Transpose", "LayerNormalization", "Transpose"]
    assert "transposes added" in result.report.render_text()
    off = lnfuse.optimize(patterns.ALL["channels_first_ln"].build(), allow_transpose=False)
    assert not off.changed


def test_function_expanded_becomes_one_op() -> None:
    result = lnfuse.optimize(patterns.ALL["function_expanded"].build())
    assert [n.op_type for n in result.model.graph.node] == ["LayerNormalization"]
    assert result.report.matches[0].pattern == "function-expanded"


def test_unbiased_variance_folds_into_epsilon_and_scale() -> None:
    case = patterns.ALL["unbiased_variance"]
    result = lnfuse.optimize(case.build())
    (ln,) = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    eps = next(a.f for a in ln.attribute if a.name == "epsilon")
    m = result.report.matches[0]
    assert "unbiased" in m.flags
    assert eps > 0


@pytest.mark.needs_opset(23)
def test_rmsnorm_is_opt_in_and_raises_opset_to_23() -> None:
    model = patterns.ALL["rmsnorm_plain_fp32"].build()
    off = lnfuse.optimize(model)
    assert not off.changed
    on = lnfuse.optimize(model, rmsnorm=True)
    assert lnfuse.opset.default_opset(on.model) == 23
    assert on.model.ir_version >= 11
    assert on.report.opset_before == 18 and on.report.opset_after == 23


def test_fp16_chain_is_flagged_overflow_prone() -> None:
    result = lnfuse.optimize(patterns.ALL["fp16_decomposed_overflow"].build())
    assert any("overflow" in w for w in result.report.warnings)


def test_report_json_and_text() -> None:
    result = lnfuse.optimize(patterns.ALL["transformer_two_ln"].build())
    d = result.report.to_dict()
    assert d["fused"] == 2 and d["by_pattern"] == {"pytorch": 2}
    text = result.report.render_text()
    assert "fused 2 LayerNormalization" in text and "opset: 14 -> 17" in text
    assert result.report.to_json()


def test_input_model_is_not_mutated() -> None:
    model = patterns.ALL["torch_opset14"].build()
    before = model.SerializeToString()
    lnfuse.optimize(model)
    assert model.SerializeToString() == before


def test_no_verify_gives_same_graph() -> None:
    model = patterns.ALL["keras_form"].build()
    a = lnfuse.optimize(model)
    b = lnfuse.optimize(model, verify=False)
    assert op_counts(a.model) == op_counts(b.model)
    assert a.report.proofs_run == 1 and b.report.proofs_run == 0


def _expanded_with_live_stats() -> onnx.ModelProto:
    """The function-expanded LN with its Mean and InvStdDev outputs also graph outputs."""
    m = patterns.ALL["function_expanded"].build()
    m.graph.output.append(onnx.helper.make_tensor_value_info("mean", TP.FLOAT, ["batch", "seq", 1]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("inv_std_dev", TP.FLOAT, ["batch", "seq", 1]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_function_expanded_reuses_mean_and_invstddev_outputs() -> None:
    model = _expanded_with_live_stats()
    result = lnfuse.optimize(model)
    out = result.model
    counts = op_counts(out)
    assert counts["LayerNormalization"] == 1 and counts["ReduceMean"] == 0 and counts["Sqrt"] == 0
    (ln,) = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    assert len([o for o in ln.output if o]) == 3
    assert "mean_invstd_reused" in result.report.matches[0].flags
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": patterns.make_input(model)}
    for ref, got in zip(run(model, feeds), run(out, feeds), strict=True):
        assert_close(ref, got, 1e-4)


def test_mean_read_outside_plain_ln_is_refused() -> None:
    # Outside a function expansion the user's graph asked for its own mean: leave it.
    result = lnfuse.optimize(patterns.ALL["neg_mean_consumed_outside"].build())
    assert not result.changed
    assert "outside the match" in result.report.refusals[0].reason


def _rms_model(dtype: int, mean: str, eps: float | None, hidden: int = 5) -> onnx.ModelProto:
    """``x / sqrt(mean(x**2) [+ eps]) * gamma`` on ``x: [2, 3, hidden]`` in ``dtype``, opset 18; the
    mean is ``ReduceMean`` or ``ReduceSum * c`` with ``mean`` giving ``c`` (``"1/N"`` or a number)."""
    from onnx import helper, numpy_helper

    np_dt = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16}[dtype]
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(np.array(2.0, np_dt), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array((1 + 0.2 * rng.standard_normal(hidden)).astype(np_dt), "gamma"),
    ]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"])]
    if mean == "mean":
        nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
    else:
        c = 1.0 / hidden if mean == "1/N" else float(mean)
        inits.append(numpy_helper.from_array(np.array(c, np_dt), "c"))
        nodes += [
            helper.make_node("ReduceSum", ["sq", "axes"], ["total"], keepdims=1),
            helper.make_node("Mul", ["total", "c"], ["ms"]),
        ]
    v = "ms"
    if eps is not None:
        inits.append(numpy_helper.from_array(np.array(eps, np_dt), "eps"))
        nodes.append(helper.make_node("Add", ["ms", "eps"], ["v"]))
        v = "v"
    nodes += [
        helper.make_node("Sqrt", [v], ["s"]),
        helper.make_node("Div", ["x", "s"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", dtype, [2, 3, hidden])],
        [helper.make_tensor_value_info("y", dtype, [2, 3, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _fused_rms(model: onnx.ModelProto, dtype: int) -> onnx.NodeProto:
    result = lnfuse.optimize(model, rmsnorm=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert op_counts(result.model)["RMSNormalization"] == 1, result.report.render_text(explain=True)
    x = (np.random.default_rng(1).standard_normal((2, 3, 5)) + 0.5).astype(
        np.float16 if dtype == TP.FLOAT16 else np.float32
    )
    (ref,), (got,) = run(model, {"x": x}), run(result.model, {"x": x})
    assert_close(ref, got, RTOL[dtype])
    return next(n for n in result.model.graph.node if n.op_type == "RMSNormalization")


@pytest.mark.needs_opset(23)
@pytest.mark.parametrize("dtype", [TP.FLOAT, TP.FLOAT16])
def test_rmsnorm_without_eps_is_fused_with_epsilon_zero(dtype: int) -> None:
    """``x / sqrt(mean(x**2))``: an RMSNorm whose eps is 0 (or an fp16 eps of 1e-8, which rounds
    to 0) is one with ``epsilon=0``."""
    for model in (
        _rms_model(dtype, "mean", None),
        _rms_model(dtype, "mean", 1e-8 if dtype == TP.FLOAT16 else 0.0),
    ):
        node = _fused_rms(model, dtype)
        assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "epsilon")) == 0.0


@pytest.mark.needs_opset(23)
def test_fp16_sum_times_rounded_reciprocal_is_a_mean() -> None:
    """fp16 stores 1/5 as 0.19995: ``ReduceSum * fl16(1/5)`` is still a mean (its factor folded
    exactly into scale and epsilon); a factor clearly off a mean is still refused."""
    _fused_rms(_rms_model(TP.FLOAT16, "1/N", 1e-5), TP.FLOAT16)
    off = lnfuse.optimize(_rms_model(TP.FLOAT16, "0.21", 1e-5), rmsnorm=True)
    assert not off.changed
    assert any("not a mean" in r.reason for r in off.report.refusals), off.report.render_text(explain=True)


def test_fp16_unbiased_factor_is_told_from_a_mean_over_many_elements() -> None:
    """Over 2048 elements N/(N-1) stored in fp16 is 1 + 2**-10, as near to 1 as fp16's tolerance
    for a mean allows: the nearer of the two (here the unbiased factor) names the variance."""
    from onnx import helper, numpy_helper

    n = 2048
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(n / (n - 1), np.float16), "unbias"),
        numpy_helper.from_array(np.array(1e-5, np.float16), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["v"]),
        helper.make_node("Mul", ["v", "unbias"], ["vu"]),
        helper.make_node("Add", ["vu", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unbiased",
        [helper.make_tensor_value_info("x", TP.FLOAT16, [1, 2, n])],
        [helper.make_tensor_value_info("y", TP.FLOAT16, [1, 2, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    result = lnfuse.optimize(model)
    (match,) = result.report.matches
    assert "unbiased" in match.flags and match.pattern == "unbiased-variance"
    x = np.random.default_rng(2).standard_normal((1, 2, n)).astype(np.float16)
    (ref,), (got,) = run(model, {"x": x}), run(result.model, {"x": x})
    assert_close(ref, got, RTOL[TP.FLOAT16])
