"""models.inline gives what onnx.inliner gives (compared where the installed onnx has it, >= 1.15)."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
from onnx import TensorProto, helper

from models.inline import inline_local_functions


def _model(calls: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info(f"y{calls - 1}", TensorProto.FLOAT, [2, 8])
    schema = onnx.defs.get_schema("LayerNormalization", 17)
    params = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in ("g", "b")]
    probe = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "m", ""], epsilon=1e-3)
    body = onnx.FunctionProto()
    body.ParseFromString(
        schema.get_context_dependent_function_with_opset_version(
            17, probe.SerializeToString(), [v.type.SerializeToString() for v in (x, *params)]
        )
    )
    body.domain = "f"
    nodes = [
        helper.make_node(
            "LayerNormalization", ["x" if i == 0 else f"y{i - 1}", "g", "b"], [f"y{i}", "", ""], domain="f"
        )
        for i in range(calls)
    ]
    graph = helper.make_graph(nodes, "g", [x, *params], [y])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("f", 1)],
        ir_version=8,
        functions=[body],
    )


@pytest.mark.parametrize("calls", [1, 2])
def test_inlined_model_is_checked_and_has_no_calls(calls: int) -> None:
    out = inline_local_functions(_model(calls))
    assert not out.functions and all(n.domain == "" for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx.inliner") is None, reason="onnx < 1.15 has no onnx.inliner"
)
@pytest.mark.parametrize("calls", [1, 2])
def test_same_bytes_as_onnx_inliner(calls: int) -> None:
    import onnx.inliner

    model = _model(calls)
    expected = onnx.inliner.inline_local_functions(model).SerializeToString()
    assert inline_local_functions(model).SerializeToString() == expected
