"""Issue #14: one precision policy for the per-match proof, ``lnfuse check`` and ``--validate``.

An output is compared at the tolerance of the narrowest float type the *original* computes
through on the way to it (``lnfuse.precision``). These tests pin the two sides of that:
mixed-precision exports from the real tools (CPU fp16 autocast, onnxconverter-common fp16 with
``keep_io_types``) pass optimize -> check and ``--validate``, while real errors are still
caught: a 3e-4 gamma change in an fp32 model, a 10x epsilon change in an fp16-inside model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import lnfuse
from lnfuse.check import check
from lnfuse.cli import main
from lnfuse.precision import Basis, FloatKind, Rounding, output_tolerances, proof_tolerance
from models.recurrent import EXPORTED, count_decomposed_ln

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models" / "fixtures").rglob("*.onnx")) + sorted(
    (ROOT / "models" / "exported").rglob("*.onnx")
)
AUTOCAST = ROOT / "models" / "exported" / "bert_tiny_mlm_autocast_fp16_opset14.onnx"
FP16_KEEPIO = ROOT / "models" / "exported" / "bert_tiny_fp16_keepio_opset14.onnx"
FP32_BLOCK = ROOT / "models" / "exported" / "transformer_block_opset14.onnx"
MIXED = [c for c in EXPORTED if c.mixed_precision]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# -- every shipped model: optimize, then check; --validate writes the same model ---------------


@pytest.mark.parametrize("path", MODELS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_optimize_then_check_and_validate(path: Path, tmp_path: Path) -> None:
    opset = next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"opset {opset} is newer than onnx {onnx.__version__}")
    plain, validated = tmp_path / "plain.onnx", tmp_path / "validated.onnx"
    res = invoke("optimize", str(path), "-o", str(plain))
    assert res.exit_code == 0, res.output
    res = invoke("optimize", str(path), "--validate", "-o", str(validated))
    assert res.exit_code == 0, res.output
    assert validated.read_bytes() == plain.read_bytes()
    res = invoke("check", str(path), str(plain))
    assert res.exit_code == 0, res.output


# -- the mixed-precision exports ---------------------------------------------------------------


@pytest.mark.parametrize("case", MIXED, ids=lambda c: c.name)
def test_mixed_precision_exports_fully_fused(case) -> None:  # type: ignore[no-untyped-def]
    result = lnfuse.optimize(ROOT / "models" / "exported" / f"{case.name}.onnx")
    assert result.changed and len(result.report.matches) == case.expect_ln
    assert count_decomposed_ln(result.model) == 0
    again = lnfuse.optimize(result.model)
    assert not again.changed and again.model is result.model


def test_check_says_which_tolerance_and_why(tmp_path: Path) -> None:
    out = tmp_path / "ac.onnx"
    assert invoke("optimize", str(AUTOCAST), "-o", str(out)).exit_code == 0
    res = invoke("check", str(AUTOCAST), str(out))
    assert res.exit_code == 0, res.output
    assert "logits: float16 inside (first at '" in res.output
    assert "rtol=0.01 atol=0.01 (output float32)" in res.output
    payload = json.loads(invoke("check", str(AUTOCAST), str(out), "--json").output)
    (tol,) = payload["tolerances"]
    assert (tol["output"], tol["basis"], tol["through"], tol["dtype"]) == (
        "logits",
        "inside",
        "float16",
        "float32",
    )
    assert payload["outputs"][0]["rtol"] == 0.01


def test_optimize_reports_removed_fp16_rounding() -> None:
    report = lnfuse.optimize(AUTOCAST).report
    flagged = [m for m in report.matches if Rounding.FLOAT16.value in m.flags]
    assert [m.output for m in flagged] == ["/inner/cls/predictions/transform/LayerNorm/Add_1_output_0"]
    assert any("16-bit rounding inside 1 norm(s) removed" in w for w in report.warnings)
    # fp32 norms are not flagged, nor are the all-fp16 norms of the converted model (no Cast inside).
    assert not any(
        f.endswith("_rounding_removed") for m in lnfuse.optimize(FP32_BLOCK).report.matches for f in m.flags
    )
    assert not any("16-bit rounding" in w for w in lnfuse.optimize(FP16_KEEPIO).report.warnings)


def test_fp16_keepio_tolerance_is_fp16_inside() -> None:
    (tol,) = output_tolerances(onnx.load(FP16_KEEPIO)).values()
    assert tol.basis is Basis.INSIDE and (tol.rtol, tol.atol) == (1e-2, 1e-2)


# -- fp32 stays fp32 ---------------------------------------------------------------------------


def _scaled_initializer(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), name))
            return out
    raise AssertionError(f"no initializer {name}")


def test_pure_fp32_model_keeps_fp32_tolerance() -> None:
    (tol,) = output_tolerances(onnx.load(FP32_BLOCK)).values()
    assert tol.basis is Basis.OUTPUT and (tol.rtol, tol.atol) == (1e-5, 1e-5)
    assert proof_tolerance([FloatKind.FLOAT32]) == (1e-4, 1e-4, 1e-3)
    assert proof_tolerance([FloatKind.FLOAT32, FloatKind.FLOAT16]) == (2e-2, 2e-2, 5e-2)


def test_fp32_gamma_scaled_by_3e4_fails_check() -> None:
    original = onnx.load(FP32_BLOCK)
    fused = lnfuse.optimize(original).model
    ln = next(n for n in fused.graph.node if n.op_type == "LayerNormalization")
    wrong = _scaled_initializer(fused, ln.input[1], 1 + 3e-4)
    result = check(original, wrong)
    assert not result.ok and result.failing_outputs == ["y"]
    assert result.tolerances[0].basis is Basis.OUTPUT and result.tolerances[0].rtol == 1e-5
    assert check(original, fused).ok


def test_fp16_weights_cast_up_are_not_on_the_path() -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w16")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w32"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    (tol,) = output_tolerances(helper.make_model(graph)).values()
    assert tol.basis is Basis.OUTPUT and tol.rtol == 1e-5


# -- fp16 inside: eps x 10 is still caught -------------------------------------------------------


def _autocast_like_ln(eps: float) -> onnx.ModelProto:
    """The head LN of the autocast export: fp32 in, fp16 mean/centring, fp64 variance, the
    normalized value cast to fp16 and back before an fp32 affine, fp32 out."""
    rng = np.random.default_rng(3)
    f16, f64 = TensorProto.FLOAT16, TensorProto.DOUBLE
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float64), "two"),
        numpy_helper.from_array(np.array(eps, np.float64), "eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(32)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(32)).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=f16),
        helper.make_node("ReduceMean", ["x16"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x16", "mean"], ["d"]),
        helper.make_node("Cast", ["d"], ["d64"], to=f64),
        helper.make_node("Pow", ["d64", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d64", "sd"], ["n64"]),
        helper.make_node("Cast", ["n64"], ["n16"], to=f16),
        helper.make_node("Cast", ["n16"], ["n32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["n32", "gamma"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "autocast_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_fp16_inside_eps_times_10_fails_check() -> None:
    # Inputs whose variance (~3e-5) is comparable to eps, so eps matters at all.
    small = {"x": (-0.01, 0.01)}
    original = _autocast_like_ln(1e-5)
    fused = lnfuse.optimize(original)
    assert [Rounding.FLOAT16.value in m.flags for m in fused.report.matches] == [True]
    ok = check(original, fused.model, input_ranges=small)
    assert ok.ok, ok.render_text()
    assert ok.tolerances[0].basis is Basis.INSIDE
    wrong = check(original, _autocast_like_ln(1e-4), input_ranges=small)
    assert not wrong.ok and wrong.failing_outputs == ["y"]
    assert lnfuse.optimize(_autocast_like_ln(1e-4)).changed  # a norm either way; only eps differs


# -- the mutation the fuzzer made: an fp32 -> fp16 -> fp32 round trip inside an fp32 LN ---


def _fp32_ln_with_round_trip(where: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(32)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(32)).astype(np.float32), "beta"),
    ]
    nodes: list[onnx.NodeProto] = []

    def step(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        if out != where:
            return out
        nodes.append(helper.make_node("Cast", [out], [out + "_h"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", [out + "_h"], [out + "_f"], to=TensorProto.FLOAT))
        return out + "_f"

    mean = step("ReduceMean", ["x"], "mean", axes=[-1])
    d = step("Sub", ["x", mean], "d")
    var = step("ReduceMean", [step("Pow", [d, "two"], "sq")], "var", axes=[-1])
    n = step("Div", [d, step("Sqrt", [step("Add", [var, "eps"], "ve")], "sd")], "n")
    step("Add", [step("Mul", [n, "gamma"], "g"), "beta"], "y")
    graph = helper.make_graph(
        nodes,
        "round_trip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


@pytest.mark.parametrize("where", ["mean", "d", "n"])
def test_round_trip_inside_fp32_ln_is_fused_flagged_and_equal(where: str) -> None:
    original = _fp32_ln_with_round_trip(where)
    result = lnfuse.optimize(original)
    assert [m.flags for m in result.report.matches] == [("cast", Rounding.FLOAT16.value)]
    checked = check(original, result.model)
    assert checked.ok, checked.render_text()
    assert checked.tolerances[0].basis is Basis.INSIDE and checked.tolerances[0].at == f"{where}_h"
