"""Real exporter output (tf2onnx from tf_keras at opsets 13/15/17, Keras 3, paddle2onnx, jax2onnx):
every norm fused as expected, look-alikes byte-for-byte unchanged, outputs equal on ONNX Runtime
at ORT_DISABLE_ALL and in onnx.reference, every output valid ONNX.

The fixtures are committed under ``models/exported/{tf,keras3,paddle,jax}`` with the versions that
wrote them (their READMEs); the generators (``models/export_*.py``) are run by hand in their own
virtual environments, never by the tests. ``(file, LayerNormalization, RMSNormalization)`` below is
what ``lnfuse.optimize(model, rmsnorm=True)`` must produce; a 0, 0 row is a look-alike (or a model
that already holds the standard op) that must stay exactly as it is. Rows marked ``gap`` are
known misses, pinned so that any change shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_builder import random_feed

import lnfuse

ROOT = Path(__file__).resolve().parent.parent / "models" / "exported"

CASES = [
    ("tf/tfk_batch_moments_opset13", 0, 0),
    ("tf/tfk_batch_moments_opset15", 0, 0),
    ("tf/tfk_batch_moments_opset17", 0, 0),
    ("tf/tfk_batchnorm_inference_opset13", 0, 0),
    ("tf/tfk_batchnorm_inference_opset15", 0, 0),
    ("tf/tfk_batchnorm_inference_opset17", 0, 0),
    ("tf/tfk_conv_nhwc_ln_opset13", 1, 0),
    ("tf/tfk_conv_nhwc_ln_opset15", 1, 0),
    ("tf/tfk_conv_nhwc_ln_opset17", 1, 0),
    ("tf/tfk_grn_opset13", 0, 0),
    ("tf/tfk_grn_opset15", 0, 0),
    ("tf/tfk_grn_opset17", 0, 0),
    ("tf/tfk_groupnorm_opset13", 0, 0),
    ("tf/tfk_groupnorm_opset15", 0, 0),
    ("tf/tfk_groupnorm_opset17", 0, 0),
    ("tf/tfk_hand_ln_rank3_opset13", 1, 0),
    ("tf/tfk_hand_ln_rank3_opset15", 1, 0),
    ("tf/tfk_hand_ln_rank3_opset17", 1, 0),
    ("tf/tfk_hand_rmsnorm_opset13", 0, 1),
    ("tf/tfk_hand_rmsnorm_opset15", 0, 1),
    ("tf/tfk_hand_rmsnorm_opset17", 0, 1),
    ("tf/tfk_instnorm_nchw_gap_opset13", 1, 0),
    ("tf/tfk_instnorm_nchw_gap_opset15", 1, 0),
    ("tf/tfk_instnorm_nchw_gap_opset17", 1, 0),
    ("tf/tfk_instnorm_nhwc_opset13", 1, 0),
    ("tf/tfk_instnorm_nhwc_opset15", 1, 0),
    ("tf/tfk_instnorm_nhwc_opset17", 1, 0),
    ("tf/tfk_ln_2axes_eps1e-6_opset13", 1, 0),
    ("tf/tfk_ln_2axes_eps1e-6_opset15", 1, 0),
    ("tf/tfk_ln_2axes_eps1e-6_opset17", 1, 0),
    ("tf/tfk_ln_lstm_loop_opset13", 3, 0),
    ("tf/tfk_ln_lstm_loop_opset15", 3, 0),
    ("tf/tfk_ln_lstm_loop_opset17", 3, 0),
    ("tf/tfk_ln_lstm_unrolled_T6_opset13", 18, 0),  # Split gates' shapes derived by lnfuse
    ("tf/tfk_ln_lstm_unrolled_T6_opset15", 18, 0),
    ("tf/tfk_ln_lstm_unrolled_T6_opset17", 18, 0),
    ("tf/tfk_ln_rank2_opset13", 1, 0),
    ("tf/tfk_ln_rank2_opset15", 1, 0),
    ("tf/tfk_ln_rank2_opset17", 1, 0),
    ("tf/tfk_stats_pooling_opset13", 0, 0),
    ("tf/tfk_stats_pooling_opset15", 0, 0),
    ("tf/tfk_stats_pooling_opset17", 0, 0),
    ("tf/tfk_transformer_postln_opset13", 2, 0),
    ("tf/tfk_transformer_postln_opset15", 2, 0),
    ("tf/tfk_transformer_postln_opset17", 2, 0),
    ("tf/tfk_transformer_preln_eps1e-6_opset13", 3, 0),  # ranks derived past shape inference
    ("tf/tfk_transformer_preln_eps1e-6_opset15", 3, 0),
    ("tf/tfk_transformer_preln_eps1e-6_opset17", 3, 0),
    ("tf/tfk_unitnorm_opset13", 0, 0),
    ("tf/tfk_unitnorm_opset15", 0, 0),
    ("tf/tfk_unitnorm_opset17", 0, 0),
    ("keras3/k3_batchnorm_inference", 0, 0),
    ("keras3/k3_conv_nhwc_ln", 1, 0),
    ("keras3/k3_groupnorm", 0, 0),
    ("keras3/k3_ln_2axes", 1, 0),
    ("keras3/k3_ln_lstm_loop", 3, 0),  # gamma/beta reach the body as loop-carried values passed through
    ("keras3/k3_ln_lstm_unrolled_T6", 18, 0),
    ("keras3/k3_rmsnorm", 0, 1),
    ("keras3/k3_transformer_preln", 3, 0),
    ("keras3/k3_unitnorm", 0, 0),
    ("paddle/paddle_batchnorm2d_eval_opset13", 0, 0),
    ("paddle/paddle_encoder_postnorm_opset13", 2, 0),
    ("paddle/paddle_encoder_postnorm_opset17", 0, 0),
    ("paddle/paddle_encoder_prenorm_opset13", 2, 0),
    ("paddle/paddle_f_layer_norm_eps1e-12_opset13", 1, 0),
    ("paddle/paddle_groupnorm_opset13", 0, 0),
    ("paddle/paddle_instancenorm2d_opset13", 0, 0),
    ("paddle/paddle_layernorm_2d_opset13", 1, 0),
    ("paddle/paddle_layernorm_noaffine_opset13", 1, 0),
    ("paddle/paddle_layernorm_opset11", 1, 0),
    ("paddle/paddle_layernorm_opset13", 1, 0),
    ("paddle/paddle_layernorm_opset16", 1, 0),
    ("paddle/paddle_layernorm_opset17", 0, 0),
    ("paddle/paddle_layernorm_opset18", 0, 0),
    ("paddle/paddle_rmsnorm_llama_opset13", 0, 1),
    ("jax/jax_linen_layernorm_2d_opset23", 1, 0),
    ("jax/jax_linen_layernorm_opset23", 1, 0),
    ("jax/jax_linen_rmsnorm_opset23", 0, 1),
    ("jax/jax_nnx_batchnorm_eval_opset23", 0, 0),
    ("jax/jax_nnx_encoder_postnorm_opset23", 2, 0),
    ("jax/jax_nnx_encoder_prenorm_opset23", 2, 0),
    ("jax/jax_nnx_groupnorm_opset23", 0, 0),
    ("jax/jax_nnx_instancenorm_opset23", 0, 0),
    ("jax/jax_nnx_layernorm_fp16_opset23", 1, 0),
    ("jax/jax_nnx_layernorm_native_opset17", 0, 0),
    ("jax/jax_nnx_layernorm_noaffine_opset23", 1, 0),
    ("jax/jax_nnx_layernorm_opset13", 1, 0),
    ("jax/jax_nnx_layernorm_opset17", 1, 0),
    ("jax/jax_nnx_layernorm_opset18", 1, 0),
    ("jax/jax_nnx_layernorm_opset23", 1, 0),
    (
        "jax/jax_nnx_layernorm_slowvar_opset23",
        0,
        0,
    ),  # gap: Where(constant row, 0, x - mean) and a float64 variance island: refused
    ("jax/jax_nnx_rmsnorm_fp16_opset23", 0, 1),
    ("torch/torch_rmsnorm_noeps_opset17", 0, 1),  # x * rsqrt(mean(x**2)): epsilon 0
    ("torch/torch_rmsnorm_fp16_sum_opset17", 0, 1),  # fp16 sum * 0.19995 and an eps fp16 makes 0
    ("jax/jax_nnx_rmsnorm_native_opset23", 0, 0),
    ("jax/jax_nnx_rmsnorm_opset18", 0, 1),
    ("jax/jax_nnx_rmsnorm_opset23", 0, 1),
]
GAPS = {
    "jax/jax_nnx_layernorm_slowvar_opset23",
}


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize(("name", "n_ln", "n_rms"), CASES, ids=[c[0] for c in CASES])
def test_exporter_fixture(name: str, n_ln: int, n_rms: int) -> None:
    path = ROOT / f"{name}.onnx"
    original = onnx.load(path)
    if _opset(original) > onnx.defs.onnx_opset_version():
        pytest.skip(f"opset {_opset(original)} is newer than onnx {onnx.__version__}")
    if n_rms and onnx.defs.onnx_opset_version() < 23:
        pytest.skip(f"RMSNormalization needs opset 23; onnx {onnx.__version__} has none")
    before = original.SerializeToString()
    result = lnfuse.optimize(original, rmsnorm=True)
    report = result.report
    got = (
        sum(m.op == "LayerNormalization" for m in report.matches),
        sum(m.op == "RMSNormalization" for m in report.matches),
    )
    assert got == (n_ln, n_rms), report.render_text(explain=True)
    assert original.SerializeToString() == before  # the input is never modified
    if n_ln + n_rms == 0:
        assert not result.changed and result.model is original
        return
    if name not in GAPS:  # every norm of the model fused: no refusal, no reduction left over
        assert not report.refusals and not report.left_alone, report.render_text(explain=True)
    onnx.checker.check_model(result.model, full_check=True)
    lnfuse.assert_equivalent(original, result.model)


SMALL = [c[0] for c in CASES if c[1] + c[2] and "lstm" not in c[0] and "transformer" not in c[0]]


@pytest.mark.parametrize("name", SMALL)
def test_fused_fixture_runs_in_onnx_reference(name: str) -> None:
    """onnx.reference is strict about the standard: the fused model runs there as the original does."""
    from onnx.reference import ReferenceEvaluator

    original = onnx.load(ROOT / f"{name}.onnx")
    if _opset(original) > onnx.defs.onnx_opset_version():
        pytest.skip("opset newer than the installed onnx")
    fused = lnfuse.optimize(original, rmsnorm=True).model
    feed = random_feed(original, seed=0, loc=0.2)
    try:
        want = ReferenceEvaluator(original).run(None, feed)
    except Exception as err:  # the original itself does not run there: nothing to compare
        pytest.skip(f"the original does not run in onnx.reference: {type(err).__name__}")
    got = ReferenceEvaluator(fused).run(None, feed)
    for w, g in zip(want, got, strict=True):
        tol = 2e-2 if w.dtype == np.float16 else 1e-4
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=tol, atol=tol)
