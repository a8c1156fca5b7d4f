"""Regressions from an adversarial hunt for wrong fusions and invalid outputs.

Each builds the smallest graph that exposed the problem: overridable initializers, opset-20
GridSample mode names, a keepdims=0 statistic reduced again, a function expansion with a
static shape, N from ``Gather(Shape(x), -1)`` with a scalar index, attribute-to-input
conversions inside If branches that reuse output names.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import lnfuse
from lnfuse.protos import iter_nodes
from models.inline import inline_local_functions

vi = oh.make_tensor_value_info


def _sess(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ln_nodes(eps: str, out: str) -> list[onnx.NodeProto]:
    return [
        oh.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        oh.make_node("Sub", ["x", "m"], ["d"]),
        oh.make_node("Mul", ["d", "d"], ["d2"]),
        oh.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        oh.make_node("Add", ["v", eps], ["ve"]),
        oh.make_node("Sqrt", ["ve"], ["s"]),
        oh.make_node("Div", ["d", "s"], [out]),
    ]


def test_initializers_that_are_graph_inputs_stay_overridable() -> None:
    nodes = [*_ln_nodes("E", "n"), oh.make_node("Mul", ["n", "G"], ["y"])]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, [2, 3, 8]), vi("E", TP.FLOAT, []), vi("G", TP.FLOAT, [8])],
        [vi("y", TP.FLOAT, [2, 3, 8])],
        [nh.from_array(np.array(1e-5, np.float32), "E"), nh.from_array(np.ones(8, np.float32), "G")],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    r = lnfuse.optimize(m)
    # eps and gamma may be overridden by the caller: neither may be folded into an attribute.
    assert not any(n.op_type == "LayerNormalization" for n in r.model.graph.node)
    assert [i.name for i in r.model.graph.input] == ["x", "E", "G"]


def test_graph_inputs_are_kept_when_something_else_is_rewritten() -> None:
    nodes = [
        *_ln_nodes("eps", "y"),
        oh.make_node("Add", ["z", "W"], ["w_out"]),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, [2, 3, 8]), vi("z", TP.FLOAT, [4]), vi("W", TP.FLOAT, [4])],
        [vi("y", TP.FLOAT, [2, 3, 8]), vi("w_out", TP.FLOAT, [4])],
        [nh.from_array(np.array(1e-5, np.float32), "eps"), nh.from_array(np.ones(4, np.float32), "W")],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    r = lnfuse.optimize(m)
    assert r.changed
    assert [i.name for i in r.model.graph.input] == ["x", "z", "W"]
    feeds = {
        "x": np.ones((2, 3, 8), np.float32),
        "z": np.zeros(4, np.float32),
        "W": np.full(4, 7, np.float32),
    }
    assert np.all(_sess(r.model).run(["w_out"], feeds)[0] == 7)


@pytest.mark.needs_opset(23)
def test_gridsample_modes_are_renamed_when_the_opset_passes_20() -> None:
    nodes = [
        oh.make_node("Mul", ["x", "x"], ["q"]),
        oh.make_node("ReduceMean", ["q", "ax"], ["mq"]),
        oh.make_node("Add", ["mq", "eps"], ["e"]),
        oh.make_node("Sqrt", ["e"], ["s"]),
        oh.make_node("Div", ["x", "s"], ["y"]),
        oh.make_node("GridSample", ["img", "grid"], ["gs"], mode="bilinear"),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, [2, 3, 8]), vi("img", TP.FLOAT, [1, 1, 4, 4]), vi("grid", TP.FLOAT, [1, 3, 3, 2])],
        [vi("y", TP.FLOAT, [2, 3, 8]), vi("gs", TP.FLOAT, [1, 1, 3, 3])],
        [nh.from_array(np.array(1e-6, np.float32), "eps"), nh.from_array(np.array([-1], np.int64), "ax")],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    r = lnfuse.optimize(m, rmsnorm=True)
    assert lnfuse.opset.default_opset(r.model) == 23
    gsn = next(n for n in r.model.graph.node if n.op_type == "GridSample")
    assert oh.get_attribute_value(gsn.attribute[0]) == b"linear"
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.normal(size=(2, 3, 8)).astype(np.float32),
        "img": rng.normal(size=(1, 1, 4, 4)).astype(np.float32),
        "grid": rng.uniform(-1, 1, size=(1, 3, 3, 2)).astype(np.float32),
    }
    for a, b in zip(_sess(m).run(None, feeds), _sess(r.model).run(None, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_keepdims0_statistic_reduced_again_is_never_a_row_mean() -> None:
    nodes = [
        oh.make_node("ReduceMean", ["x"], ["m0"], axes=[-1], keepdims=0),
        oh.make_node("ReduceMean", ["m0"], ["m1"], axes=[-1], keepdims=1),
        oh.make_node("Unsqueeze", ["m1"], ["m"], axes=[-1]),
        oh.make_node("Sub", ["x", "m"], ["d"]),
        oh.make_node("Mul", ["d", "d"], ["d2"]),
        oh.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        oh.make_node("Add", ["v", "eps"], ["ve"]),
        oh.make_node("Sqrt", ["ve"], ["s"]),
        oh.make_node("Div", ["d", "s"], ["y"]),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, [2, 3, 8])],
        [vi("y", TP.FLOAT, [2, 3, 8])],
        [nh.from_array(np.array(1e-5, np.float32), "eps")],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 11)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    for verify in (True, False):  # refused by the algebra itself, not only by the proof
        assert not lnfuse.optimize(m, verify=verify).changed


def _expanded(shape: list, dtype: int = TP.FLOAT) -> onnx.ModelProto:
    h = shape[-1]
    npdt = np.float32 if dtype == TP.FLOAT else np.float64
    rng = np.random.default_rng(0)
    x_info = vi("x", dtype, list(shape))
    node = oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)
    pt = oh.make_tensor_type_proto(dtype, [h])
    body = onnx.FunctionProto()
    body.ParseFromString(
        onnx.defs.get_schema("LayerNormalization", 17).get_context_dependent_function_with_opset_version(
            17, node.SerializeToString(), [x_info.type.SerializeToString()] + [pt.SerializeToString()] * 2
        )
    )
    body.domain = node.domain = "exp"
    del node.attribute[:]
    g = oh.make_graph(
        [node],
        "g",
        [x_info],
        [vi("y", dtype, list(shape))],
        [
            nh.from_array(rng.normal(size=h).astype(npdt), "gamma"),
            nh.from_array(rng.normal(size=h).astype(npdt), "beta"),
        ],
    )
    m = oh.make_model(
        g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("exp", 1)], ir_version=8, functions=[body]
    )
    m = inline_local_functions(m)
    kept = [o for o in m.opset_import if o.domain != "exp"]
    del m.opset_import[:]
    m.opset_import.extend(kept)
    return m


def test_function_expansion_with_static_shape_is_fused() -> None:
    for shape in ([2, 3, 8], ["b", "s", 8]):
        r = lnfuse.optimize(_expanded(shape))
        assert [n.op_type for n in r.model.graph.node] == ["LayerNormalization"], shape


def test_unbiased_n_from_scalar_gather_of_shape() -> None:
    nodes = [
        oh.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        oh.make_node("Sub", ["x", "m"], ["d"]),
        oh.make_node("Mul", ["d", "d"], ["d2"]),
        oh.make_node("ReduceSum", ["d2"], ["ss"], axes=[-1]),
        oh.make_node("Shape", ["x"], ["shp"]),
        oh.make_node("Gather", ["shp", "last"], ["n"], axis=0),
        oh.make_node("Cast", ["n"], ["nf"], to=TP.FLOAT),
        oh.make_node("Sub", ["nf", "one"], ["nm1"]),
        oh.make_node("Div", ["ss", "nm1"], ["v"]),
        oh.make_node("Add", ["v", "eps"], ["ve"]),
        oh.make_node("Sqrt", ["ve"], ["s"]),
        oh.make_node("Div", ["d", "s"], ["y"]),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, ["b", 3, 8])],
        [vi("y", TP.FLOAT, ["b", 3, 8])],
        [
            nh.from_array(np.array(-1, np.int64), "last"),  # a scalar index, as x.size(-1) exports
            nh.from_array(np.array(1.0, np.float32), "one"),
            nh.from_array(np.array(1e-5, np.float32), "eps"),
        ],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 12)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    r = lnfuse.optimize(m)
    assert [n.op_type for n in r.model.graph.node] == ["LayerNormalization"]
    x = {"x": np.random.default_rng(1).normal(0.5, 1, (2, 3, 8)).astype(np.float32)}
    np.testing.assert_allclose(_sess(m).run(None, x)[0], _sess(r.model).run(None, x)[0], rtol=1e-5, atol=1e-5)


def test_axes_conversion_inside_if_branches_with_shared_output_names() -> None:
    bt = oh.make_graph(
        [oh.make_node("Unsqueeze", ["z"], ["u"], axes=[0])], "t", [], [vi("u", TP.FLOAT, [1, 2, 4])]
    )
    be = oh.make_graph(
        [oh.make_node("Unsqueeze", ["z"], ["u"], axes=[1])], "e", [], [vi("u", TP.FLOAT, [2, 1, 4])]
    )
    nodes = [*_ln_nodes("eps", "y"), oh.make_node("If", ["c"], ["o"], then_branch=bt, else_branch=be)]
    g = oh.make_graph(
        nodes,
        "g",
        [vi("x", TP.FLOAT, [2, 3, 8]), vi("z", TP.FLOAT, [2, 4]), vi("c", TP.BOOL, [])],
        [vi("y", TP.FLOAT, [2, 3, 8]), vi("o", TP.FLOAT, [None, None, 4])],
        [nh.from_array(np.array(1e-6, np.float32), "eps")],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 11)], ir_version=8)
    r = lnfuse.optimize(m)
    assert r.changed and lnfuse.opset.default_opset(r.model) == 17
    onnx.checker.check_model(r.model, full_check=True)
    assert sum(n.op_type == "LayerNormalization" for n in iter_nodes(r.model.graph)) == 1
    z = np.arange(8, dtype=np.float32).reshape(2, 4)
    x = np.random.default_rng(2).normal(size=(2, 3, 8)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "z": z, "c": np.array(c)}
        for a, b in zip(_sess(m).run(None, feeds), _sess(r.model).run(None, feeds), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_float64_function_expansion_keeps_its_float32_statistics() -> None:
    m = _expanded(["b", "s", 8], TP.DOUBLE)
    r = lnfuse.optimize(m)
    (ln,) = [n for n in r.model.graph.node if n.op_type == "LayerNormalization"]
    assert next(a.i for a in ln.attribute if a.name == "stash_type") == 1
    x = {"x": np.random.default_rng(3).normal(0.5, 1, (2, 3, 8))}
    np.testing.assert_allclose(_sess(m).run(None, x)[0], _sess(r.model).run(None, x)[0], rtol=1e-5, atol=1e-5)
