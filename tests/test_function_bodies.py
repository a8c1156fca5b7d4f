"""ONNX's own function bodies of LayerNormalization (opsets 17 and 18, every axis) and
RMSNormalization (opset 23) become one op each, Mean / InvStdDev served by the op's own outputs.

The fixtures are committed (``python -m models.function_bodies`` rewrites them from onnx's
backend-test expansion helper); these tests only read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import lnfuse

DIR = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "function_bodies"
LN = sorted(p for p in DIR.glob("ln*.onnx") if "_inputs" not in p.name)
RMS = sorted(DIR.glob("rms*.onnx"))


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = model.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return {x.name: rng.normal(0.3, 1.5, size=shape).astype(np.float32)}


def _fused_alone(path: Path, op: str, **options: object) -> onnx.ModelProto:
    original = onnx.load(path)
    result = lnfuse.optimize(original, **options)
    assert [n.op_type for n in result.model.graph.node] == [op], result.report.render_text(explain=True)
    onnx.checker.check_model(result.model, full_check=True)
    lnfuse.assert_equivalent(original, result.model)
    # onnx.reference is a strict second runtime: every output (Y, Mean, InvStdDev) agrees there too.
    feed = _feed(original)
    want = ReferenceEvaluator(original).run(None, feed)
    got = ReferenceEvaluator(result.model).run(None, feed)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    return result.model


@pytest.mark.parametrize("path", LN, ids=[p.stem for p in LN])
def test_layer_norm_body_is_one_op(path: Path) -> None:
    fused = _fused_alone(path, "LayerNormalization")
    outputs = [o.name for o in fused.graph.output]
    assert list(fused.graph.node[0].output)[: len(outputs)] == outputs  # Y, Mean, InvStdDev directly


@pytest.mark.needs_opset(23)
@pytest.mark.parametrize("path", RMS, ids=[p.stem for p in RMS])
def test_rms_norm_body_is_one_op(path: Path) -> None:
    _fused_alone(path, "RMSNormalization", rmsnorm=True)


def test_every_axis_and_both_opsets_are_covered() -> None:
    names = {p.stem for p in LN}
    for opset in (17, 18):
        assert {f"ln{opset}_axis{a}" for a in range(-4, 4)} <= names
    assert {f"rms23_axis{a}" for a in range(-4, 4)} == {p.stem for p in RMS}
