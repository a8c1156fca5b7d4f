"""Checks that the fixture models themselves are right: valid ONNX, runnable, numerically a LayerNorm.

These tests do not touch lnfuse: they prove the ground truth (models/patterns.py and the committed
models/fixtures/*.onnx) before the matcher is tested against it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from models.generate import DEFAULT_OUT, readme_text
from models.patterns import (
    ALL,
    NEGATIVE,
    POSITIVE,
    Case,
    ir_version_for,
    make_input,
    reference_layernorm,
)

CASES = list(ALL.values())
IDS = [c.name for c in CASES]
POS_IDS = [c.name for c in POSITIVE]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {c.name: c.build() for c in CASES}


def test_case_names() -> None:
    assert len(POSITIVE) + len(NEGATIVE) == len(ALL)
    for c in CASES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", c.name), c.name
        assert c.why, c.name
    assert all(c.name.startswith("neg_") for c in NEGATIVE)
    assert not any(c.name.startswith("neg_") for c in POSITIVE)


def test_case_expectations() -> None:
    for c in NEGATIVE:
        assert c.expect_ln == 0 and c.expect_rms == 0, c.name
        assert c.reference is None, c.name
    for c in POSITIVE:
        assert c.expect_ln + c.expect_rms >= 1, c.name
        assert c.reference is not None, c.name
        assert c.finite, c.name
        if c.expect_rms:
            assert c.options.get("rmsnorm") is True, c.name
    assert ALL["neg_rmsnorm_without_flag"].options == {}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_is_valid(case: Case, built: dict[str, onnx.ModelProto]) -> None:
    model = built[case.name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == ir_version_for(_opset(model))
    assert [o.domain for o in model.opset_import] == [""]
    assert [i.name for i in model.graph.input] == ["x"]
    assert model.graph.output[0].name == "y"
    assert model.ByteSize() < 50_000
    assert not model.functions
    # gamma/beta and other float parameters are non-trivial (never all ones / all zeros)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size > 1:
            assert not np.all(arr == 1) and not np.all(arr == 0), (case.name, init.name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_runs_on_onnxruntime(case: Case, built: dict[str, onnx.ModelProto]) -> None:
    model = built[case.name]
    x = make_input(model, seed=1)
    outputs = _session(model).run(None, {"x": x})
    assert len(outputs) == len(model.graph.output)
    if case.finite:
        for out in outputs:
            assert np.all(np.isfinite(out)), case.name


@pytest.mark.parametrize("case", POSITIVE, ids=POS_IDS)
def test_positive_matches_reference(case: Case, built: dict[str, onnx.ModelProto]) -> None:
    model = built[case.name]
    assert case.reference is not None
    for seed in (0, 7):
        x = make_input(model, seed=seed)
        y = _session(model).run(["y"], {"x": x})[0]
        expected = case.reference(x)
        assert y.shape == expected.shape
        if y.dtype == np.float16:
            rtol, atol = 1e-2, 1e-2
        elif y.dtype == np.float64:
            rtol, atol = 1e-10, 1e-12
        else:
            rtol, atol = 1e-4, 1e-5
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=atol, err_msg=case.name)


def test_reference_layernorm_matches_onnx_op() -> None:
    """The numpy reference itself agrees with onnxruntime's LayerNormalization-17 over two axes."""
    rng = np.random.default_rng(3)
    gamma = rng.standard_normal((4, 8)).astype(np.float32)
    beta = rng.standard_normal((4, 8)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-2, epsilon=1e-3)
    graph = helper.make_graph(
        [node],
        "ln",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4, 8])],
        [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((3, 4, 8)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    ref = reference_layernorm(x, axes=(-2, -1), eps=float(np.float32(1e-3)), gamma=gamma, beta=beta)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_fp16_decomposed_overflow_collapses_on_large_inputs() -> None:
    """In true fp16 arithmetic Pow(d, 2) overflows to inf for |x - mean| > 256 and the output is garbage.

    onnxruntime's CPU provider hides this: its InsertCastTransformer (which runs even at
    ORT_DISABLE_ALL) lifts the fp16 ops it has no kernel for into fp32. The ONNX reference evaluator
    keeps every op in fp16, as a GPU provider would.
    """
    case = ALL["fp16_decomposed_overflow"]
    model = case.build()
    assert case.reference is not None
    pow_out = next(n.output[0] for n in model.graph.node if n.op_type == "Pow")
    beta = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "beta"))
    evaluator = ReferenceEvaluator(model)

    x = make_input(model, seed=0)
    y = evaluator.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y.astype(np.float64), case.reference(x), rtol=1e-2, atol=1e-2)

    x_big = make_input(model, seed=0, scale=1000.0)
    assert np.all(np.isfinite(x_big))
    squared, y_big = evaluator.run([pow_out, "y"], {"x": x_big})
    assert squared.dtype == np.float16 and np.isinf(squared).any()
    # var = inf -> std = inf -> d / std = 0: the normalized part is lost, y is beta on every row
    np.testing.assert_array_equal(y_big, np.broadcast_to(beta, y_big.shape))
    assert np.max(np.abs(y_big.astype(np.float64) - case.reference(x_big))) > 0.5


def test_neg_pow3_is_not_a_norm() -> None:
    """The third central moment is negative on some rows, so Sqrt gives NaN: no LayerNorm behaves so."""
    model = ALL["neg_pow3"].build()
    y = _session(model).run(None, {"x": make_input(model, seed=1)})[0]
    assert np.isnan(y).any()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_committed_fixture_is_up_to_date(case: Case, built: dict[str, onnx.ModelProto]) -> None:
    path = DEFAULT_OUT / f"{case.name}.onnx"
    assert path.is_file(), f"{path} missing: run python -m models.generate"
    assert path.read_bytes() == built[case.name].SerializeToString(), (
        f"{path} is stale: run python -m models.generate"
    )


def test_no_stray_fixture_files() -> None:
    on_disk = {p.stem for p in Path(DEFAULT_OUT).glob("*.onnx")}
    assert on_disk == set(ALL)


def test_readme_is_up_to_date() -> None:
    readme = DEFAULT_OUT / "README.md"
    assert readme.read_text(encoding="utf-8") == readme_text()
    for name in ALL:
        assert f"`{name}`" in readme_text()


def test_builds_are_deterministic() -> None:
    for case in CASES:
        assert case.build().SerializeToString() == case.build().SerializeToString(), case.name
