"""Forms other exporters write, built small in code: GlobalAveragePool as the mean (tf2onnx),
ReduceSumSquare, statistics a CSE pass merged between two norms, and their look-alikes.

The real exporter output of these forms is in ``models/exported/{tf,keras3,paddle,jax}`` and is
tested in ``test_exported_fixtures.py``; these graphs pin each form down on its own.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import lnfuse

H = 16
_RNG = np.random.default_rng(7)


def _vec(name: str, mean: float = 1.0) -> onnx.TensorProto:
    return nh.from_array((mean + 0.1 * _RNG.standard_normal(H)).astype(np.float32), name)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return nh.from_array(np.array(value, np.float32), name)


def _model(nodes: list, outputs: list[str], inits: list, opset: int = 15) -> onnx.ModelProto:
    x = h.make_tensor_value_info("x", TP.FLOAT, ["N", 8, H])
    outs = [h.make_tensor_value_info(o, TP.FLOAT, ["N", 8, H]) for o in outputs]
    graph = h.make_graph(nodes, "g", [x], outs, inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def _fused(model: onnx.ModelProto, **options: object) -> list[str]:
    result = lnfuse.optimize(model, **options)
    onnx.checker.check_model(result.model, full_check=True)
    lnfuse.assert_equivalent(model, result.model)
    return [n.op_type for n in result.model.graph.node]


def _keras_gap() -> onnx.ModelProto:
    """Keras 3 through tf2onnx: GlobalAveragePool means, ``x*s + (Neg(mean)*s + beta)``."""
    nodes = [
        h.make_node("GlobalAveragePool", ["x"], ["m"]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Mul", ["d", "d"], ["d2"]),
        h.make_node("GlobalAveragePool", ["d2"], ["v"]),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Reciprocal", ["sd"], ["r"]),
        h.make_node("Mul", ["r", "gamma"], ["s"]),
        h.make_node("Mul", ["x", "s"], ["xs"]),
        h.make_node("Neg", ["m"], ["nm"]),
        h.make_node("Mul", ["nm", "s"], ["ms"]),
        h.make_node("Add", ["ms", "beta"], ["bb"]),
        h.make_node("Add", ["xs", "bb"], ["y"]),
    ]
    return _model(nodes, ["y"], [_vec("gamma"), _vec("beta", 0.0), _scalar("eps", 1e-3)])


def test_global_average_pool_is_the_mean() -> None:
    assert _fused(_keras_gap()) == ["LayerNormalization"]


@pytest.mark.needs_opset(23)
def test_reduce_sum_square_rmsnorm() -> None:
    nodes = [
        h.make_node("ReduceSumSquare", ["x"], ["ss"], axes=[-1]),
        h.make_node("Div", ["ss", "n"], ["ms"]),
        h.make_node("Add", ["ms", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["x", "sd"], ["xn"]),
        h.make_node("Mul", ["xn", "gamma"], ["y"]),
    ]
    model = _model(nodes, ["y"], [_vec("gamma"), _scalar("n", H), _scalar("eps", 1e-6)])
    assert _fused(model, rmsnorm=True) == ["RMSNormalization"]


def test_reduce_sum_square_without_the_count_is_refused() -> None:
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("ReduceSumSquare", ["d"], ["v"], axes=[-1]),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["y"]),
    ]
    model = _model(nodes, ["y"], [_scalar("eps", 1e-5)])
    result = lnfuse.optimize(model)
    assert not result.changed
    assert any("sum over 16 elements" in r.reason for r in result.report.refusals)


def test_merged_statistics_and_normalized_value_give_two_ops() -> None:
    """A CSE pass merged mean, variance and x_hat of two LNs of one input: two LayerNormalization."""
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Pow", ["d", "two"], ["d2"]),
        h.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["n"]),
        h.make_node("Mul", ["n", "g1"], ["a1"]),
        h.make_node("Add", ["a1", "b1"], ["y1"]),
        h.make_node("Mul", ["n", "g2"], ["a2"]),
        h.make_node("Add", ["a2", "b2"], ["y2"]),
    ]
    inits = [_vec("g1"), _vec("g2"), _vec("b1", 0), _vec("b2", 0), _scalar("two", 2), _scalar("eps", 1e-5)]
    model = _model(nodes, ["y1", "y2"], inits, opset=17)
    assert _fused(model) == ["LayerNormalization", "LayerNormalization"]


def test_merged_normalized_value_read_elsewhere_keeps_one_op() -> None:
    """x_hat itself is also a graph output: only the affine-free norm closes."""
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Mul", ["d", "d"], ["d2"]),
        h.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["n"]),
        h.make_node("Mul", ["n", "g1"], ["y1"]),
        h.make_node("Mul", ["n", "g2"], ["y2"]),
    ]
    model = _model(nodes, ["y1", "y2", "n"], [_vec("g1"), _vec("g2"), _scalar("eps", 1e-5)], opset=17)
    assert _fused(model) == ["LayerNormalization", "Mul", "Mul"]


def _tf_keras_ln(
    *, stats_of: str = "x4", axes: tuple[int, ...] = (0, 2, 3), training: bool = False, back: str = "shape"
) -> onnx.ModelProto:
    """tf_keras' LayerNormalization as tf2onnx writes it: x [N, 8, H] viewed as [1, rows, H, 1], the
    training-mode FusedBatchNormV3 statistics (ReduceMean, ReduceSumSquare / count from Shape,
    Squeeze), an inference BatchNormalization with Expand'ed ones/zeros, Reshape back, gamma, beta.
    ``stats_of`` / ``axes`` / ``training`` / ``back`` make the look-alikes."""
    ax = h.make_tensor("ax", TP.INT64, [len(axes)], list(axes))
    nodes = [
        h.make_node("Reshape", ["x", "view"], ["x4"]),
        h.make_node("Identity", ["x4"], ["other"]),
        h.make_node("ReduceMean", [stats_of], ["m"], axes=list(axes), keepdims=1),
        h.make_node("Sub", [stats_of, "m"], ["d"]),
        h.make_node("ReduceSumSquare", ["d"], ["ss"], axes=list(axes), keepdims=0),
        h.make_node("Squeeze", ["m", "ax"], ["ms"]),
        h.make_node("Shape", ["x4"], ["s4"]),
        h.make_node("Gather", ["s4", "ax"], ["g4"]),
        h.make_node("ReduceProd", ["g4"], ["n"], axes=[0], keepdims=0),
        h.make_node("Cast", ["n"], ["nf"], to=TP.FLOAT),
        h.make_node("Div", ["ss", "nf"], ["var"]),
        h.make_node("Shape", ["x"], ["sx"]),
        h.make_node("Slice", ["sx", "zero", "two"], ["lead"]),
        h.make_node("ReduceProd", ["lead"], ["rows"], axes=[0], keepdims=1),
        h.make_node("Expand", ["one", "rows"], ["ones"]),
        h.make_node("Expand", ["nil", "rows"], ["zeros"]),
        h.make_node(
            "BatchNormalization",
            ["x4", "ones", "zeros", "ms", "var"],
            ["bn"],
            epsilon=1e-3,
            **({"training_mode": 1} if training else {}),
        ),
        h.make_node("Reshape", ["bn", "sx" if back == "shape" else "flat"], ["y4"]),
        h.make_node("Mul", ["y4", "gamma"], ["yg"]),
        h.make_node("Add", ["yg", "beta"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array([1, -1, H, 1], np.int64), "view"),
        nh.from_array(np.array([-1, 8, H], np.int64), "flat"),
        nh.from_array(np.array([0], np.int64), "zero"),
        nh.from_array(np.array([2], np.int64), "two"),
        _scalar("one", 1.0),
        _scalar("nil", 0.0),
        _vec("gamma"),
        _vec("beta", 0.0),
        ax,
    ]
    return _model(nodes, ["y"], inits)


def test_tf_keras_fused_batch_norm_path_is_one_layer_norm() -> None:
    assert _fused(_tf_keras_ln()) == ["LayerNormalization"]


def test_tf_keras_path_reshaped_back_by_a_constant_shape() -> None:
    assert _fused(_tf_keras_ln(back="const")) == ["LayerNormalization"]


def test_batch_norm_look_alikes_stay_unchanged() -> None:
    """BatchNormalization fed by statistics of another tensor, over other axes, or in training mode."""
    for model in (
        _tf_keras_ln(stats_of="other"),  # a different tensor (same values, but not x's own)
        _tf_keras_ln(axes=(0, 1, 3)),  # statistics over the rows, not over H
        _tf_keras_ln(training=True),
    ):
        before = model.SerializeToString()
        result = lnfuse.optimize(model)
        assert not result.changed and result.model is model
        assert model.SerializeToString() == before
        assert any(a.op == "BatchNormalization" for a in result.report.left_alone) or result.report.refusals


def test_max_clamped_one_pass_variance() -> None:
    """JAX: ``var = max(E[x^2] - E[x]^2, 0)``; the clamp only catches negative rounding."""
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Mul", ["x", "x"], ["x2"]),
        h.make_node("ReduceMean", ["x2"], ["q"], axes=[-1]),
        h.make_node("Mul", ["m", "m"], ["m2"]),
        h.make_node("Sub", ["q", "m2"], ["v"]),
        h.make_node("Max", ["v", "nil"], ["vp"]),
        h.make_node("Add", ["vp", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["n"]),
        h.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    model = _model(nodes, ["y"], [_vec("gamma"), _scalar("nil", 0.0), _scalar("eps", 1e-6)], opset=17)
    assert _fused(model) == ["LayerNormalization"]


def test_max_with_a_positive_floor_is_not_a_variance() -> None:
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Mul", ["d", "d"], ["d2"]),
        h.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        h.make_node("Max", ["v", "floor"], ["vp"]),
        h.make_node("Sqrt", ["vp"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["y"]),
    ]
    model = _model(nodes, ["y"], [_scalar("floor", 1e-3)], opset=17)
    assert not lnfuse.optimize(model).changed
