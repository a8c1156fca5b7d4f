"""Weights in external data stay on disk: the CLI (and ``optimize(path, lazy_external=True)``)
never reads initializers over 1 MiB; the output's data file gets them by a chunked copy, byte for
byte, and the input files are untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import lnfuse
from lnfuse.cli import main
from lnfuse.io import file_digest

H = 64
BIG = 1 << 19  # 2 MiB of float32 weights: over the 1 MiB that stays on disk


def _model(tmp_path: Path) -> Path:
    """A decomposed LN of x and, beside it, z = MatMul(x, W) with 2 MiB weights in external data."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((H, BIG // H)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), "gamma"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", H])],
        [
            helper.make_tensor_value_info("y", TP.FLOAT, ["N", H]),
            helper.make_tensor_value_info("z", TP.FLOAT, ["N", BIG // H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="model.data", size_threshold=1 << 20)
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.iterdir())}


def test_cli_streams_weights_it_never_reads(tmp_path: Path) -> None:
    src = _model(tmp_path)
    before = _digests(src.parent)
    out = tmp_path / "out" / "model.ln.onnx"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert _digests(src.parent) == before  # input model and data file untouched
    fused = onnx.load(out)  # with its external data, from next to the output
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "LayerNormalization"]
    original = onnx.load(src)
    want = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    for t in fused.graph.initializer:
        if t.name == "w":
            assert np.array_equal(numpy_helper.to_array(t), want[t.name])  # same bytes
    onnx.checker.check_model(str(out), full_check=True)
    lnfuse.assert_equivalent(str(src), str(out))


def test_api_lazy_result_keeps_references_until_saved(tmp_path: Path) -> None:
    src = _model(tmp_path)
    result = lnfuse.optimize(src, lazy_external=True)
    big = [t for t in result.model.graph.initializer if t.name == "w"]
    assert all(t.data_location == TP.EXTERNAL and not t.raw_data for t in big)  # never read
    out = result.save(tmp_path / "saved.onnx")
    lnfuse.assert_equivalent(str(src), str(out))
    # The default API result is self-contained, as before.
    plain = lnfuse.optimize(src)
    assert all(t.data_location != TP.EXTERNAL for t in plain.model.graph.initializer)
