"""``lnfuse.optimize(path)`` builds its result in the model it loaded (big weights are not copied).

:meth:`lnfuse.graph.ModelGraph.export` with ``consume=True`` rewrites the loaded ModelProto in
place: initializers above the big-tensor threshold stay where they are. The result must be the
same model as the copying export gives, and every failure after the export must still hand back
the untouched original (re-read from the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lnfuse
import lnfuse.api as api
import lnfuse.io as lio
from lnfuse import opset as opset_mod
from lnfuse.graph import _BIG_TENSOR
from lnfuse.protos import iter_graphs

H = 64
BIG = _BIG_TENSOR // 4 // H + 8  # rows of a float32 [BIG, H] weight just over the threshold


def ln_block_nodes(nodes: list, x: str, p: str, gamma: str, beta: str, two: str, eps: str) -> str:
    """The 9-node PyTorch (opset < 17) LayerNorm over the last axis; returns its output name."""

    def add(op: str, inputs: list[str], tag: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{p}/{tag}"], name=f"{p}/{tag}", **attrs))
        return f"{p}/{tag}"

    mean = add("ReduceMean", [x], "mean", axes=[-1], keepdims=1)
    d = add("Sub", [x, mean], "sub")
    var = add("ReduceMean", [add("Pow", [d, two], "pow")], "var", axes=[-1], keepdims=1)
    std = add("Sqrt", [add("Add", [var, eps], "add_eps")], "sqrt")
    return add("Add", [add("Mul", [add("Div", [d, std], "div"), gamma], "mul"), beta], "add_beta")


def _model(opset: int = 17) -> onnx.ModelProto:
    """x[2, BIG] @ W[BIG, H] (big) -> decomposed LN -> @ W2[H, H] (small) -> y, plus a graph input
    that is also an initializer and an unused initializer."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((0.01 * rng.standard_normal((BIG, H))).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32), "W2"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(H)).astype(np.float32), "beta"),
        numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
        numpy_helper.from_array(np.asarray(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.ones(3, np.float32), "unused"),
        numpy_helper.from_array(np.asarray(1.0, np.float32), "scale_in"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    ln = ln_block_nodes(nodes, "h", "ln", "gamma", "beta", "two", "eps")
    nodes.append(helper.make_node("MatMul", [ln, "W2"], ["h2"], name="mm2"))
    nodes.append(helper.make_node("Mul", ["h2", "scale_in"], ["y"], name="scale"))
    graph = helper.make_graph(
        nodes,
        "consume",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, BIG]),
            helper.make_tensor_value_info("scale_in", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, H])],
        inits,
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model.metadata_props.add(key="k", value="v")
    return model


def _save(tmp_path: Path, model: onnx.ModelProto, external: bool) -> Path:
    p = tmp_path / "m.onnx"
    if external:
        onnx.save(model, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data")
    else:
        onnx.save(model, p)
    return p


def _inits(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_path_result_equals_copying_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    p = _save(tmp_path, _model(opset=14), external)
    loaded: list[onnx.ModelProto] = []
    real_load = lio.load_model

    def spy(path: object, **kw: object) -> onnx.ModelProto:
        m = real_load(path, **kw)  # type: ignore[arg-type]
        loaded.append(m)
        return m

    monkeypatch.setattr(lio, "load_model", spy)
    by_path = lnfuse.optimize(p)
    assert len(loaded) == 1 and by_path.model is loaded[0]  # built in the loaded model itself
    by_proto = lnfuse.optimize(real_load(p))
    a, b = by_path.model, by_proto.model
    assert by_path.changed and by_proto.changed
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert _inits(a) == _inits(b)
    assert "unused" not in _inits(a)
    for field in ("input", "output", "value_info"):
        assert [v.SerializeToString() for v in getattr(a.graph, field)] == [
            v.SerializeToString() for v in getattr(b.graph, field)
        ]
    assert a.graph.doc_string == b.graph.doc_string == "graph doc"
    assert a.graph.name == b.graph.name
    assert [o.SerializeToString() for o in a.opset_import] == [o.SerializeToString() for o in b.opset_import]
    assert a.metadata_props[0].value == "v"
    assert a.ir_version == b.ir_version
    onnx.checker.check_model(a, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, BIG)).astype(np.float32)
    np.testing.assert_allclose(_run(a, x), _run(b, x), rtol=1e-6, atol=1e-6)
    # The big weight kept its exact bytes.
    w = numpy_helper.to_array(next(t for t in _model().graph.initializer if t.name == "W"))
    assert _inits(a)["W"] == w.tobytes()


def _assert_original(result: lnfuse.OptimizeResult, path: Path) -> None:
    assert not result.changed
    assert result.model.SerializeToString() == lio.load_model(path).SerializeToString()


def test_failed_output_check_returns_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _save(tmp_path, _model(), external=False)
    real = api._full_check
    calls: list[int] = []

    def failing_once(model: onnx.ModelProto) -> str | None:
        calls.append(1)
        return "forced failure" if len(calls) == 1 else real(model)

    monkeypatch.setattr(api, "_full_check", failing_once)
    result = lnfuse.optimize(p)
    assert any("internal error" in w for w in result.report.warnings)
    _assert_original(result, p)


def test_failed_opset_raise_returns_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _save(tmp_path, _model(opset=14), external=True)
    monkeypatch.setattr(opset_mod, "raise_opset", lambda *a, **k: "forced refusal")
    result = lnfuse.optimize(p)
    assert "forced refusal" in (result.report.opset_note or "")
    _assert_original(result, p)


def test_big_weights_read_by_a_body_and_unused_ones(tmp_path: Path) -> None:
    """Big weights read from inside If branches (outer scope: W by the main graph and a branch,
    W_body by both branches only) stay in the main graph, once each; an unused big one goes."""
    model = _model(opset=17)
    rng = np.random.default_rng(3)
    model.graph.initializer.append(
        numpy_helper.from_array((0.01 * rng.standard_normal((BIG, H))).astype(np.float32), "W_body")
    )
    model.graph.initializer.append(numpy_helper.from_array(np.ones((BIG, H), np.float32), "W_unused"))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(True), "flag"))
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_body"], ["b_out"], name="body_mm")],
        "branch",
        [],
        [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [2, H])],
    )
    other = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["o_w"], name="other_mm"),
            helper.make_node("MatMul", ["x", "W_body"], ["o_b"], name="other_mm_body"),
            helper.make_node("Add", ["o_w", "o_b"], ["o_out"], name="other_add"),
        ],
        "other",
        [],
        [helper.make_tensor_value_info("o_out", TensorProto.FLOAT, [2, H])],
    )
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["z"], name="if", then_branch=branch, else_branch=other)
    )
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, H]))
    p = _save(tmp_path, model, external=True)
    by_path = lnfuse.optimize(p)
    by_proto = lnfuse.optimize(lio.load_model(p))
    assert by_path.changed
    a, b = _inits(by_path.model), _inits(by_proto.model)
    assert a == b
    assert "W_unused" not in a
    # Every initializer once, in the main graph where it was (not copied into the branches).
    for result in (by_path, by_proto):
        names = [t.name for g in iter_graphs(result.model.graph) for t in g.initializer]
        assert sorted(names) == sorted(set(names))
        assert {"W", "W_body"} <= {t.name for t in result.model.graph.initializer}
    onnx.checker.check_model(by_path.model, full_check=True)
    x = np.random.default_rng(4).standard_normal((2, BIG)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = [
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )
        for m in (by_path.model, by_proto.model, lio.load_model(p))
    ]
    for got in outs[:2]:
        for g, want in zip(got, outs[2], strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
