"""Opset raising: exact conversions, refusals that leave the model alone, and preservation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import lnfuse
from lnfuse import opset as opset_mod

H = 16


def _ln_nodes(x: str, out: str, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    rng = np.random.default_rng(len(prefix))
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.1, H).astype(np.float32), f"{prefix}g"),
        numpy_helper.from_array(rng.normal(0, 0.1, H).astype(np.float32), f"{prefix}b"),
        numpy_helper.from_array(np.array(2.0, np.float32), f"{prefix}two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), f"{prefix}eps"),
    ]
    p = prefix
    nodes = [
        helper.make_node("ReduceMean", [x], [p + "m"], axes=[-1]),
        helper.make_node("Sub", [x, p + "m"], [p + "d"]),
        helper.make_node("Pow", [p + "d", p + "two"], [p + "sq"]),
        helper.make_node("ReduceMean", [p + "sq"], [p + "v"], axes=[-1]),
        helper.make_node("Add", [p + "v", p + "eps"], [p + "ve"]),
        helper.make_node("Sqrt", [p + "ve"], [p + "s"]),
        helper.make_node("Div", [p + "d", p + "s"], [p + "n"]),
        helper.make_node("Mul", [p + "n", p + "g"], [p + "ng"]),
        helper.make_node("Add", [p + "ng", p + "b"], [out]),
    ]
    return nodes, inits


def _model(extra: list[onnx.NodeProto], opset: int, out_shape: list, extra_inits=()) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    nodes, inits = _ln_nodes("x", "ln", "a_")
    g = helper.make_graph(
        nodes + extra,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3, H])],
        [helper.make_tensor_value_info("y", TP.FLOAT, out_shape)],
        initializer=inits + list(extra_inits),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


X = np.random.default_rng(0).normal(0.5, 1, (2, 3, H)).astype(np.float32)


def test_axes_attributes_move_to_inputs_exactly() -> None:
    extra = [
        helper.make_node("Unsqueeze", ["ln"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[0]),
        helper.make_node("ReduceSum", ["s"], ["r"], axes=[-1], keepdims=1),
        helper.make_node("Split", ["s"], ["p1", "p2"], axis=-1, split=[4, 12]),
        helper.make_node("Concat", ["p2", "p1"], ["c"], axis=-1),
        helper.make_node("Add", ["c", "r"], ["y"]),
    ]
    m = _model(extra, 11, [2, 3, H])
    onnx.checker.check_model(m, full_check=True)
    res = lnfuse.optimize(m)
    out = res.model
    assert opset_mod.default_opset(out) == 17 and out.ir_version >= 8
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, X), _run(m, X), rtol=1e-5, atol=1e-5)
    sq = next(n for n in out.graph.node if n.op_type == "Squeeze")
    assert len(sq.input) == 2 and not sq.attribute


def test_softmax_over_non_last_axis_is_rewritten_exactly() -> None:
    # Opset 13 changed what Softmax(axis=1) means on a rank-3 input; the old meaning is
    # spelled as Flatten -> Softmax(-1) -> Reshape so the raise stays exact.
    extra = [helper.make_node("Softmax", ["ln"], ["y"], axis=1)]
    m = _model(extra, 11, [2, 3, H])
    res = lnfuse.optimize(m)
    assert res.changed and opset_mod.default_opset(res.model) == 17
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Flatten") == 1 and ops.count("Reshape") == 1
    onnx.checker.check_model(res.model, full_check=True)
    np.testing.assert_allclose(_run(res.model, X), _run(m, X), rtol=1e-5, atol=1e-6)


def test_softmax_in_a_branch_and_in_its_parent_are_both_rewritten() -> None:
    """An opset-11 Softmax(axis=1) in an If branch is rewritten even when one in the main graph is
    too: the main graph's rebuilt node list must carry the rewritten branch, not the old one."""
    branch = helper.make_graph(
        [helper.make_node("Softmax", ["ln"], ["in_branch"], axis=1)],
        "then",
        [],
        [helper.make_tensor_value_info("in_branch", TP.FLOAT, [2, 3, H])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["ln"], ["neg"])],
        "else",
        [],
        [helper.make_tensor_value_info("neg", TP.FLOAT, [2, 3, H])],
    )
    extra = [
        helper.make_node("Softmax", ["ln"], ["main_sm"], axis=0),
        helper.make_node("ReduceSum", ["main_sm"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    m = _model(extra, 11, [2, 3, H], [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    onnx.checker.check_model(m, full_check=True)
    out = lnfuse.optimize(m).model
    assert opset_mod.default_opset(out) == 17
    body = next(
        a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch"
    )
    assert [n.op_type for n in body.node] == ["Flatten", "Softmax", "Shape", "Reshape"]
    np.testing.assert_allclose(_run(out, X), _run(m, X), rtol=1e-5, atol=1e-6)


def test_roialign_blocks_the_raise() -> None:
    rois = numpy_helper.from_array(np.array([[0, 0, 1, 1]], np.float32), "rois")
    idx = numpy_helper.from_array(np.array([0], np.int64), "bi")
    extra = [
        helper.make_node("Unsqueeze", ["ln"], ["ln4"], axes=[0]),
        helper.make_node("RoiAlign", ["ln4", "rois", "bi"], ["y"], output_height=1, output_width=1),
    ]
    m = _model(extra, 11, [1, 2, 1, 1], extra_inits=[rois, idx])
    res = lnfuse.optimize(m)
    assert not res.changed and res.model is m
    assert res.report.found_not_rewritten and not res.report.matches
    assert "RoiAlign" in res.report.opset_note
    assert "found but not rewritten" in res.report.render_text()


def test_softmax_over_last_axis_is_fine() -> None:
    extra = [helper.make_node("Softmax", ["ln"], ["y"], axis=-1)]
    m = _model(extra, 12, [2, 3, H])
    res = lnfuse.optimize(m)
    assert res.changed and opset_mod.default_opset(res.model) == 17
    np.testing.assert_allclose(_run(res.model, X), _run(m, X), rtol=1e-5, atol=1e-5)


def test_below_opset_11_only_identical_schemas() -> None:
    extra = [helper.make_node("Identity", ["ln"], ["y"])]
    m = _model(extra, 10, [2, 3, H])
    reason = opset_mod.plan(m, 17)
    assert reason is not None and "opset 11" in reason


def test_other_domains_and_metadata_are_kept() -> None:
    extra = [helper.make_node("Identity", ["ln"], ["y"])]
    m = _model(extra, 14, [2, 3, H])
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    helper.set_model_props(m, {"author": "me"})
    m.doc_string = "doc"
    m.graph.doc_string = "graph doc"
    out = lnfuse.optimize(m).model
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("ai.onnx.ml", 3)}
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "me")]
    assert out.doc_string == "doc" and out.graph.doc_string == "graph doc"


def test_target_opset_18_converts_reduce_axes() -> None:
    extra = [helper.make_node("ReduceMax", ["ln"], ["y"], axes=[-1], keepdims=1)]
    m = _model(extra, 14, [2, 3, 1])
    res = lnfuse.optimize(m, target_opset=18)
    out = res.model
    assert opset_mod.default_opset(out) == 18
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, X), _run(m, X), rtol=1e-5, atol=1e-5)


def test_equal_split_names_its_output_count_at_18() -> None:
    """Split-18 takes ``split`` sizes or ``num_outputs``: an opset-11 / 13 equal split (neither)
    raised to 18 gets ``num_outputs``; one with sizes keeps them and gets no count."""
    for old in (11, 13):
        for sizes in (None, [4, 12]):
            kw = {} if sizes is None or old >= 13 else {"split": sizes}
            ins = ["ln"] if sizes is None or old < 13 else ["ln", "sizes"]
            inits = (
                [numpy_helper.from_array(np.array(sizes or [0], np.int64), "sizes")] if len(ins) > 1 else []
            )
            extra = [
                helper.make_node("Split", ins, ["p1", "p2"], axis=-1, **kw),
                helper.make_node("Concat", ["p2", "p1"], ["y"], axis=-1),
            ]
            m = _model(extra, old, [2, 3, H], inits)
            onnx.checker.check_model(m, full_check=True)
            out = lnfuse.optimize(m, target_opset=18).model
            assert opset_mod.default_opset(out) == 18
            onnx.checker.check_model(out, full_check=True)
            np.testing.assert_allclose(_run(out, X), _run(m, X), rtol=1e-5, atol=1e-5)
            split = next(n for n in out.graph.node if n.op_type == "Split")
            counts = [a.i for a in split.attribute if a.name == "num_outputs"]
            assert counts == ([2] if sizes is None else []) and len(split.input) == (
                1 if sizes is None else 2
            )


@pytest.mark.needs_opset(22)
def test_ceil_mode_pools_are_not_raised_past_22() -> None:
    """MaxPool / AveragePool 22 drop a last ceil_mode window that would start in the right padding
    (here: 5 columns at opset 13, 4 at 22), so a ceil_mode pool blocks a raise past 21 only."""
    for op in ("MaxPool", "AveragePool"):
        for ceil in (0, 1):
            extra = [
                helper.make_node("Reshape", ["ln", "shape4"], ["x4"]),
                helper.make_node(
                    op, ["x4"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 1], ceil_mode=ceil
                ),
            ]
            shape4 = numpy_helper.from_array(np.array([2, 1, 3, H], np.int64), "shape4")
            m = _model(extra, 13, [2, 1, 1 + ceil, H // 2 + ceil], [shape4])
            onnx.checker.check_model(m, full_check=True)
            why = opset_mod.plan(m, 22)
            assert (why is not None) == bool(ceil) and opset_mod.plan(m, 21) is None
            if ceil:
                assert "ceil_mode" in why
            out = lnfuse.optimize(m, target_opset=21).model
            np.testing.assert_allclose(_run(out, X), _run(m, X), rtol=1e-5, atol=1e-5)


def test_min_ir_version() -> None:
    assert opset_mod.min_ir_version(17) == 8
    if onnx.defs.onnx_opset_version() >= 23:
        assert opset_mod.min_ir_version(23) == 11
