"""Sanity checks of the committed exported fixtures in ``models/exported/``.

For every case of ``models.recurrent.EXPORTED``: the file exists, passes the full
ONNX checker, runs on onnxruntime (CPU, all graph optimizations off) with seeded
inputs, gives finite outputs, and holds exactly ``expect_ln`` decomposed
LayerNorms.

The LN count does not use any matcher of lnfuse: every decomposed LN takes one
square root of ``variance + eps``, so we count ``Sqrt`` nodes plus ``Pow`` nodes
with a constant exponent of ±0.5, in the main graph and in every subgraph
(``count_decomposed_ln``).  As a second, independent count, every LN of these
fixtures has exactly two ``ReduceMean`` nodes (mean and variance) and nothing
else in them uses ``ReduceMean``.  No PyTorch needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.recurrent import EXPORTED, OUT_DIR, ExportedCase, count_decomposed_ln, count_ops, fixture_feeds


def _path(case: ExportedCase) -> Path:
    return OUT_DIR / f"{case.name}.onnx"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_registry_covers_every_file() -> None:
    names = [c.name for c in EXPORTED]
    assert len(names) == len(set(names))
    on_disk = {p.stem for p in OUT_DIR.glob("*.onnx")}
    assert on_disk == set(names)


@pytest.mark.parametrize("case", EXPORTED, ids=lambda c: c.name)
def test_fixture_checks(case: ExportedCase) -> None:
    path = _path(case)
    assert path.exists(), f"missing {path}"
    assert path.stat().st_size < 300_000
    model = onnx.load(str(path))
    max_ir = 8 if model.opset_import[0].version <= 17 else 10
    assert model.ir_version <= max_ir  # onnxruntime 1.31 reads IR <= 13, and we pin lower
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("case", EXPORTED, ids=lambda c: c.name)
def test_fixture_ln_count(case: ExportedCase) -> None:
    model = onnx.load(str(_path(case)))
    assert count_decomposed_ln(model) == case.expect_ln
    assert count_ops(model, "ReduceMean") == 2 * case.expect_ln
    assert count_ops(model, "LayerNormalization") == 0
    if case.steps is not None:
        assert case.ln_per_step is not None
        assert case.steps * case.ln_per_step == case.expect_ln


@pytest.mark.parametrize("case", EXPORTED, ids=lambda c: c.name)
def test_fixture_runs_on_ort(case: ExportedCase) -> None:
    path = _path(case)
    model = onnx.load(str(path))
    sess = _session(path)
    feeds = fixture_feeds(model, seed=len(case.name))
    outputs_per_feed = []
    for feed in feeds:
        outputs = sess.run(None, feed)
        assert outputs
        for out in outputs:
            assert np.all(np.isfinite(out.astype(np.float64))), case.name
        outputs_per_feed.append(outputs)
    if len(feeds) == 2:
        # The If branches differ (eps and gain/bias), so cond must change the result.
        assert not np.allclose(outputs_per_feed[0][0], outputs_per_feed[1][0])


def test_count_sees_pow_half_form() -> None:
    """The counter also recognises Pow(v, ±0.5) square roots (not written by PyTorch)."""
    nodes = [
        onnx.helper.make_node("Pow", ["x", "half"], ["a"]),
        onnx.helper.make_node("Pow", ["x", "mhalf"], ["b"]),
        onnx.helper.make_node("Pow", ["x", "two"], ["c"]),
        onnx.helper.make_node("Sqrt", ["x"], ["d"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        onnx.numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "mhalf"),
        onnx.numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
    ]
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [vi("x", onnx.TensorProto.FLOAT, [4])],
        [vi(n, onnx.TensorProto.FLOAT, [4]) for n in "abcd"],
        initializer=inits,
    )
    assert count_decomposed_ln(onnx.helper.make_model(graph)) == 3


def test_unrolled_steps_share_parameters() -> None:
    """Traced unrolled RNNs reuse one gain/bias initializer pair per LN across all time steps."""
    for case in EXPORTED:
        if case.steps is None:
            continue
        model = onnx.load(str(_path(case)))
        gain_users: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type == "Mul":
                for name in node.input:
                    if name.endswith(".weight"):
                        gain_users[name] = gain_users.get(name, 0) + 1
        assert len(gain_users) == case.ln_per_step, case.name
        assert all(n == case.steps for n in gain_users.values()), (case.name, gain_users)


@pytest.mark.parametrize(
    ("name", "axes", "eps"),
    [
        ("torch_layernorm_opset11", (-1,), 1e-5),
        ("torch_layernorm_opset13", (-1,), 1e-5),
        ("torch_layernorm_opset16", (-1,), 1e-5),
        ("torch_layernorm_2d_opset14", (-2, -1), 1e-5),
        ("torch_layernorm_noaffine_opset14", (-1,), 1e-5),
        ("torch_f_layer_norm_opset12", (-1,), 1e-12),
    ],
)
def test_single_ln_matches_numpy_reference(name: str, axes: tuple[int, ...], eps: float) -> None:
    """The single-LN exports really compute LayerNorm (float64 reference, initializers as gain/bias)."""
    path = OUT_DIR / f"{name}.onnx"
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    x = np.random.default_rng(0).standard_normal((2, 3, *([8, 16] if len(axes) == 2 else [64])))
    (y,) = _session(path).run(None, {"x": x.astype(np.float32)})
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    ref = (x - mean) / np.sqrt(var + eps)
    if inits:
        ref = ref * inits["weight"] + inits["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
