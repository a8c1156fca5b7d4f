"""Forms other exporters write, built small in code: GlobalAveragePool as the mean (tf2onnx),
ReduceSumSquare, statistics a CSE pass merged between two norms, and their look-alikes.

The real exporter output of these forms is in ``models/exported/{tf,keras3,paddle,jax}`` and is
tested in ``test_exported_fixtures.py``; these graphs pin each form down on its own.
"""

from __future__ import annotations

import numpy as np
import onnx
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
