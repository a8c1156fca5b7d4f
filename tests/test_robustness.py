"""Bad input through the CLI: one line, exit 2, input untouched, nothing left behind.

Also external-data round trips, preservation of what the model carries, and that a
model without any norm comes out unchanged.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import lnfuse
import lnfuse.io as lio
from lnfuse.cli import main
from models import patterns


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(res, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lnfuse: error:"), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in res.output


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_directory_as_input(tmp_path: Path) -> None:
    assert_one_line_error(invoke("optimize", str(tmp_path)))


def test_cyclic_graph(tmp_path: Path) -> None:
    g = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
        "cyc",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TP.FLOAT, [2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    p = tmp_path / "cyc.onnx"
    p.write_bytes(m.SerializeToString())
    digest = lio.file_digest(p)
    assert_one_line_error(invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx")), "cyc")
    assert lio.file_digest(p) == digest
    assert listing(tmp_path) == ["cyc.onnx"]


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])],
        "dup",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    p = tmp_path / "dup.onnx"
    p.write_bytes(m.SerializeToString())
    assert_one_line_error(invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx")))
    assert listing(tmp_path) == ["dup.onnx"]


def _external_model(tmp_path: Path) -> Path:
    m = patterns.ALL["torch_opset14"].build()
    d = tmp_path / "src"
    d.mkdir()
    p = d / "ext.onnx"
    onnx.save(
        m,
        p,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.weights",
        size_threshold=0,
    )
    return p


def test_external_data_round_trip(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    before = {p.name: lio.file_digest(p) for p in src.parent.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ext.ln.onnx"
    res = invoke("optimize", str(src), "-o", str(out))
    assert res.exit_code == 0, res.output
    assert listing(out_dir) == ["ext.ln.onnx", "ext.ln.onnx.data"]
    m = lio.load_model(out)
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["LayerNormalization"]
    assert {p.name: lio.file_digest(p) for p in src.parent.iterdir()} == before
    ref = lio.load_model(src)
    gamma_ref = {i.name: numpy_helper.to_array(i) for i in ref.graph.initializer}
    gamma_out = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for name in set(gamma_ref) & set(gamma_out):
        assert gamma_ref[name].tobytes() == gamma_out[name].tobytes()


def test_missing_external_data(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    (src.parent / "ext.weights").unlink()
    assert_one_line_error(invoke("optimize", str(src), "-o", str(tmp_path / "o.onnx")), "ext.weights")
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_path_traversal(tmp_path: Path) -> None:
    m = patterns.ALL["torch_opset14"].build()
    d = tmp_path / "m"
    d.mkdir()
    onnx.save(m, d / "a.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(d / "a.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((d / "w.bin").read_bytes())
    bad = d / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    res = invoke("optimize", str(bad), "-o", str(tmp_path / "o.onnx"))
    assert_one_line_error(res)
    assert "outside" in res.output or "secret" in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_output_directory_not_writable(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(patterns.ALL["torch_opset14"].build(), p)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(invoke("optimize", str(p), "-o", str(blocker / "o.onnx")))


def test_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(patterns.ALL["torch_opset14"].build(), p)
    digest = lio.file_digest(p)

    def full(fd: int, blob: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lio, "_write_and_sync", full)
    assert_one_line_error(invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx")), "space")
    assert listing(tmp_path) == ["m.onnx"]
    assert lio.file_digest(p) == digest


def test_checker_failure_needs_explicit_flag(tmp_path: Path) -> None:
    m = patterns.ALL["torch_opset14"].build()
    m.graph.node[0].attribute.append(helper.make_attribute("bogus", 1))
    p = tmp_path / "inv.onnx"
    p.write_bytes(m.SerializeToString())
    res = invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx"))
    assert_one_line_error(res, "onnx.checker")
    assert not (tmp_path / "o.onnx").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    p = tmp_path / "e.onnx"
    p.write_bytes(b"")
    res = CliRunner().invoke(main, ["optimize", str(p), "--debug"])
    assert res.exit_code == 2


def test_model_without_norm_is_unchanged(tmp_path: Path) -> None:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceMean", ["r"], ["y"], axes=[-1])],
        "plain",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    r = lnfuse.optimize(m)
    assert not r.changed and r.model is m and not r.report.refusals
    assert "fused 0 LayerNormalization" in r.report.render_text()


def test_preserves_value_info_functions_and_custom_ops() -> None:
    m = patterns.ALL["transformer_two_ln"].build()
    m.graph.value_info.append(helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", 32]))
    fn = helper.make_function(
        "custom.fn",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 14)],
    )
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("custom.fn", 1))
    out_name = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Twice", [out_name], ["y2"], domain="custom.fn"))
    m.graph.output.append(helper.make_tensor_value_info("y2", TP.FLOAT, ["batch", "seq", 32]))
    onnx.checker.check_model(m)
    r = lnfuse.optimize(m)
    out = r.model
    assert r.changed
    assert [f.name for f in out.functions] == ["Twice"]
    assert any(n.op_type == "Twice" and n.domain == "custom.fn" for n in out.graph.node)
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    onnx.checker.check_model(out, full_check=True)
    x = {"x": patterns.make_input(m)}
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)
    b = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
