"""Export real PaddlePaddle models with LayerNorm / RMSNorm into ``models/exported/paddle/``.

This script needs PaddlePaddle and paddle2onnx, which are *not* dependencies of
lnfuse.  Run it by hand from the repository root in a separate environment (see
``models/exported/paddle/README.md``)::

    python3 -m venv /tmp/paddlevenv
    /tmp/paddlevenv/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx onnxruntime numpy
    /tmp/paddlevenv/bin/python models/export_paddle.py

Every model is exported the way Paddle users do it,
``paddle.onnx.export(layer, path, input_spec=[InputSpec(...)], opset_version=N)``
(``paddle.jit.save`` to a PIR program, then paddle2onnx with its defaults:
``enable_optimize=True``, i.e. Polygraphy constant folding, which pip-installs
onnx_graphsurgeon and sympy into the environment on first use).  Models are
tiny (hidden 16), seeded, randomly initialised; norm gains/biases are
randomised so numeric checks mean something.  Each file is checked with
``onnx.checker`` and run on onnxruntime (CPU, ``ORT_DISABLE_ALL``) against the
Paddle dygraph output; the results and versions go into the README.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import paddle
import paddle2onnx
from paddle import nn
from paddle.static import InputSpec

OUT_DIR = Path(__file__).resolve().parent / "exported" / "paddle"
HIDDEN = 16
SEQ = 5
MAX_IR = 10

RESULTS: list[dict[str, Any]] = []
FAILURES: list[tuple[str, str]] = []


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _randomize_norms(layer: nn.Layer, scale: float = 0.1) -> None:
    """Give every norm gain/bias a non-trivial value (1 + s*N, s*N)."""
    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2D, nn.InstanceNorm2D, RMSNorm)):
            w = getattr(sub, "weight", None)
            if w is None:
                w = getattr(sub, "scale", None)  # InstanceNorm names its gain `scale`
            b = getattr(sub, "bias", None)
            if w is not None:
                w.set_value((1.0 + scale * paddle.randn(w.shape)).astype(w.dtype))
            if b is not None:
                b.set_value((scale * paddle.randn(b.shape)).astype(b.dtype))
        if isinstance(sub, nn.BatchNorm2D):
            sub._mean.set_value(0.1 * paddle.randn(sub._mean.shape))
            sub._variance.set_value(1.0 + 0.2 * paddle.rand(sub._variance.shape))


def _export(
    layer: nn.Layer,
    name: str,
    specs: list[InputSpec],
    inputs: list[np.ndarray],
    opset: int,
    what: str,
    patch: Callable[[onnx.ModelProto], str] | None = None,
    **configs: Any,
) -> None:
    """paddle.onnx.export, clamp IR, check, run on ORT against Paddle; record the result."""
    path = OUT_DIR / f"{name}.onnx"
    if path.exists():
        path.unlink()
    layer.eval()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            paddle.onnx.export(layer, str(OUT_DIR / name), input_spec=specs, opset_version=opset, **configs)
    except (Exception, SystemExit) as err:  # paddle2onnx's logging.error calls sys.exit(-1)
        print(log.getvalue())
        why = [ln.strip() for ln in log.getvalue().splitlines() if "Error" in ln and "(at " in ln]
        FAILURES.append((name, why[0][:300] if why else _first_error_line(err)))
        return
    print(log.getvalue())
    if not path.exists():  # paddle2onnx logs errors instead of raising
        FAILURES.append((name, "paddle2onnx wrote no file (see its log)"))
        return
    proto = onnx.load(str(path))
    ir_written = proto.ir_version
    if patch is not None:
        what = f"{what}; {patch(proto)}"
    if proto.ir_version > MAX_IR:
        proto.ir_version = MAX_IR
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

    # Reference: Paddle dygraph (fp32).  ORT: the exported file as written.
    with paddle.no_grad():
        ref = layer(*[paddle.to_tensor(a) for a in inputs])
    ref_np = ref.numpy() if hasattr(ref, "numpy") else ref[0].numpy()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp, arr in zip(sess.get_inputs(), inputs, strict=True):
        want = np.float16 if inp.type == "tensor(float16)" else arr.dtype
        feeds[inp.name] = arr.astype(want)
    got = sess.run(None, feeds)[0]
    err = float(np.max(np.abs(got.astype(np.float64) - ref_np.astype(np.float64))))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    RESULTS.append(
        {
            "name": name,
            "opset_req": opset,
            "opset": opset_written,
            "ir_written": ir_written,
            "ir": proto.ir_version,
            "what": what,
            "err": err,
            "nodes": len(proto.graph.node),
            "kb": path.stat().st_size / 1024,
            "ln_op": ops.get("LayerNormalization", 0),
            "in_dtype": sess.get_inputs()[0].type,
        }
    )


def _first_error_line(err: BaseException) -> str:
    """The most telling line of a (Paddle, multi-line) error message."""
    text = f"{type(err).__name__}: {err}"
    for line in text.splitlines():
        if ("Error" in line and "(at " in line) or "InvalidType" in line or "Unimplemented" in line:
            return line.strip()[:300]
    return text.splitlines()[0][:300]


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _spec(*shape: int | None, dtype: str = "float32") -> list[InputSpec]:
    return [InputSpec(list(shape), dtype, "x")]


# ----------------------------------------------------------------------------
# Layers that Paddle users write by hand
# ----------------------------------------------------------------------------


class RMSNorm(nn.Layer):
    """The RMSNorm of PaddleNLP's LLaMA (``LlamaRMSNorm``), fp32 statistics."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
        variance = hidden_states.astype("float32").pow(2).mean(-1, keepdim=True)
        hidden_states = paddle.rsqrt(variance + self.variance_epsilon) * hidden_states
        if self.weight.dtype in [paddle.float16, paddle.bfloat16]:
            hidden_states = paddle.cast(hidden_states, self.weight.dtype)
        return hidden_states * self.weight


class FunctionalRMSNorm(nn.Layer):
    """``paddle.nn.functional.rms_norm`` (Paddle >= 3.1)."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps
        self.hidden = hidden

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = paddle.nn.functional.rms_norm(x, [self.hidden], self.weight, self.eps)
        return out[0] if isinstance(out, (tuple, list)) else out


class FusedRMSNorm(nn.Layer):
    """``paddle.incubate.nn.functional.fused_rms_norm`` (PaddleNLP's fused path)."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = paddle.incubate.nn.functional.fused_rms_norm(x, self.weight, None, self.eps, begin_norm_axis=2)
        return out[0] if isinstance(out, (tuple, list)) else out


class FunctionalLayerNorm(nn.Layer):
    """``paddle.nn.functional.layer_norm`` with explicit parameters and eps 1e-12 (BERT/ERNIE)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([hidden], is_bias=True)
        self.hidden = hidden

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.layer_norm(x, [self.hidden], self.weight, self.bias, 1e-12)


# ----------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------


def export_encoders() -> None:
    for pre, tag in ((False, "postnorm"), (True, "prenorm")):
        paddle.seed(10 + int(pre))
        enc = nn.TransformerEncoderLayer(
            d_model=HIDDEN, nhead=2, dim_feedforward=2 * HIDDEN, dropout=0.0, normalize_before=pre
        )
        _randomize_norms(enc)
        _export(
            enc,
            f"paddle_encoder_{tag}_opset13",
            _spec(None, None, HIDDEN),
            [_x(2, SEQ, HIDDEN)],
            13,
            f"`nn.TransformerEncoderLayer(d_model={HIDDEN}, nhead=2, dim_feedforward={2 * HIDDEN}, dropout=0, "
            f"normalize_before={pre})`: 2 LayerNorms; x [batch, seq, {HIDDEN}] (both dynamic)",
        )
    paddle.seed(12)
    enc = nn.TransformerEncoderLayer(d_model=HIDDEN, nhead=2, dim_feedforward=2 * HIDDEN, dropout=0.0)
    _randomize_norms(enc)
    _export(
        enc,
        "paddle_encoder_postnorm_opset17",
        _spec(None, None, HIDDEN),
        [_x(2, SEQ, HIDDEN)],
        17,
        "post-norm encoder layer as above, opset 17",
    )


def export_layernorms() -> None:
    for opset in (11, 13, 16, 17, 18):
        paddle.seed(opset)
        ln = nn.LayerNorm(HIDDEN)
        _randomize_norms(ln)
        _export(
            ln,
            f"paddle_layernorm_opset{opset}",
            _spec(None, SEQ, HIDDEN),
            [_x(2, SEQ, HIDDEN, seed=opset)],
            opset,
            f"`nn.LayerNorm({HIDDEN})`, eps 1e-5; x [batch, {SEQ}, {HIDDEN}]",
        )
    paddle.seed(21)
    ln2 = nn.LayerNorm([SEQ, HIDDEN])
    _randomize_norms(ln2)
    _export(
        ln2,
        "paddle_layernorm_2d_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=21)],
        13,
        f"`nn.LayerNorm([{SEQ}, {HIDDEN}])`: two trailing axes, gain/bias [{SEQ * HIDDEN}] in Paddle",
    )
    paddle.seed(22)
    ln_na = nn.LayerNorm(HIDDEN, weight_attr=False, bias_attr=False)
    _export(
        ln_na,
        "paddle_layernorm_noaffine_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=22)],
        13,
        f"`nn.LayerNorm({HIDDEN}, weight_attr=False, bias_attr=False)`",
    )
    paddle.seed(23)
    fln = FunctionalLayerNorm(HIDDEN)
    fln.weight.set_value(1.0 + 0.1 * paddle.randn([HIDDEN]))
    fln.bias.set_value(0.1 * paddle.randn([HIDDEN]))
    _export(
        fln,
        "paddle_f_layer_norm_eps1e-12_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=23)],
        13,
        "`F.layer_norm(x, [16], w, b, 1e-12)` (BERT/ERNIE epsilon)",
    )
    # fp16: not exported.  `export_fp16_model=True` is dropped by paddle.onnx.export (not in
    # paddle2onnx_export_configs), paddle2onnx.export(..., export_fp16_model=True) on a jit.saved
    # model still writes fp32, and a `.to(dtype="float16")` layer fails to_static on CPU
    # ("layer_norm, x.dtype: float16, expected_dtype: bfloat16, float32, float64").
    FAILURES.append(
        (
            "paddle_layernorm_fp16",
            "no cheap fp16 path on CPU: `export_fp16_model=True` is ignored by paddle.onnx.export and "
            "still writes fp32 via paddle2onnx.export; an fp16 layer fails to_static (layer_norm has no "
            "CPU float16 kernel: expected bfloat16/float32/float64)",
        )
    )


def export_rmsnorms() -> None:
    paddle.seed(31)
    rms = RMSNorm(HIDDEN)
    _randomize_norms(rms)
    _export(
        rms,
        "paddle_rmsnorm_llama_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=31)],
        13,
        "hand-written PaddleNLP `LlamaRMSNorm`: `rsqrt(x.astype(f32).pow(2).mean(-1, keepdim) + 1e-6) * x * w`",
    )
    paddle.seed(32)
    frms = FunctionalRMSNorm(HIDDEN)
    frms.weight.set_value(1.0 + 0.1 * paddle.randn([HIDDEN]))
    _export(
        frms,
        "paddle_f_rms_norm_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=32)],
        13,
        "`paddle.nn.functional.rms_norm(x, [16], w, 1e-6)`",
    )
    # paddle2onnx aborts the whole process (SIGABRT) on an unsupported op, so try it in a child first.
    child = subprocess.run([sys.executable, __file__, "--probe-fused-rms"], capture_output=True, text=True)
    if child.returncode != 0:
        tail = [
            ln
            for ln in (child.stdout + child.stderr).splitlines()
            if "unsupported" in ln.lower() or "pd_op" in ln
        ]
        FAILURES.append(
            ("paddle_fused_rms_norm_opset13", f"child exit {child.returncode}; " + " / ".join(tail[:4])[:300])
        )
        return
    paddle.seed(33)
    fused = FusedRMSNorm(HIDDEN)
    fused.weight.set_value(1.0 + 0.1 * paddle.randn([HIDDEN]))
    _export(
        fused,
        "paddle_fused_rms_norm_opset13",
        _spec(None, SEQ, HIDDEN),
        [_x(2, SEQ, HIDDEN, seed=33)],
        13,
        "`paddle.incubate.nn.functional.fused_rms_norm`",
    )


def _fix_groupnorm_epsilon(proto: onnx.ModelProto, eps: float) -> str:
    """paddle2onnx 2.1.0 writes GroupNorm's InstanceNormalization with an uninitialised epsilon.

    The value changes from run to run (seen: 2.6e-17, -2.9e37, which makes the output NaN), so
    the file would be neither deterministic nor correct.  Set it to the layer's epsilon and say so.
    """
    for node in proto.graph.node:
        if node.op_type == "InstanceNormalization":
            for attr in node.attribute:
                if attr.name == "epsilon" and attr.f != np.float32(eps):
                    written = attr.f
                    attr.f = float(eps)
                    return (
                        f"**epsilon patched**: paddle2onnx wrote `InstanceNormalization.0` epsilon={written:.3g} "
                        f"(uninitialised, varies per run); set to the layer's {eps:g}"
                    )
    return "epsilon as written"


def export_lookalikes() -> None:
    chans = 8
    img = _spec(None, chans, 4, 4)
    paddle.seed(41)
    gn = nn.GroupNorm(num_groups=2, num_channels=chans)
    _randomize_norms(gn)
    _export(
        gn,
        "paddle_groupnorm_opset13",
        img,
        [_x(2, chans, 4, 4, seed=41)],
        13,
        "`nn.GroupNorm(2, 8)` on x [batch, 8, 4, 4] (must not become LayerNormalization)",
        patch=lambda proto: _fix_groupnorm_epsilon(proto, gn._epsilon),
    )
    paddle.seed(42)
    inorm = nn.InstanceNorm2D(chans)
    _randomize_norms(inorm)
    _export(
        inorm,
        "paddle_instancenorm2d_opset13",
        img,
        [_x(2, chans, 4, 4, seed=42)],
        13,
        "`nn.InstanceNorm2D(8)` (affine) on x [batch, 8, 4, 4]",
    )
    paddle.seed(43)
    bn = nn.BatchNorm2D(chans)
    _randomize_norms(bn)
    _export(
        bn,
        "paddle_batchnorm2d_eval_opset13",
        img,
        [_x(2, chans, 4, 4, seed=43)],
        13,
        "`nn.BatchNorm2D(8)` in eval mode, random running stats",
    )


def _write_readme() -> None:
    lines = [
        "# PaddlePaddle exports",
        "",
        "Written by `models/export_paddle.py` (run by hand, see its docstring) with",
        "`paddle.onnx.export(layer, path, input_spec=[InputSpec(...)], opset_version=N)`,",
        "paddle2onnx defaults (Polygraphy constant folding on). Random seeded init, hidden 16.",
        "",
        f"Versions: paddlepaddle {paddle.__version__}, paddle2onnx {paddle2onnx.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"python {sys.version.split()[0]}.",
        "",
        f"IR version: clamped to at most {MAX_IR} and re-saved with onnx when the exporter wrote more "
        "(column `IR`: written -> saved). `max abs err`: onnxruntime CPU (`ORT_DISABLE_ALL`) vs "
        "Paddle dygraph fp32 output on a [2, 5, 16] (or [2, 8, 4, 4]) normal input.",
        "",
        "| file | opset (asked -> written) | IR | nodes | KB | input | max abs err | what |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        ir = f"{r['ir_written']}" if r["ir_written"] == r["ir"] else f"{r['ir_written']} -> {r['ir']}"
        lines.append(
            f"| `{r['name']}.onnx` | {r['opset_req']} -> {r['opset']} | {ir} | {r['nodes']} | {r['kb']:.1f} | "
            f"{r['in_dtype']} | {r['err']:.2e} | {r['what']} |"
        )
    if FAILURES:
        lines += ["", "## Not exported", ""]
        for name, why in FAILURES:
            lines.append(f"* `{name}`: {why}")
    # Keep the hand-written notes (lnfuse results, forms) that follow the marker.
    readme = OUT_DIR / "README.md"
    marker = "<!-- notes below are kept when this script rewrites the README -->"
    kept = (
        readme.read_text().split(marker, 1)[1] if readme.exists() and marker in readme.read_text() else "\n"
    )
    lines += ["", marker]
    readme.write_text("\n".join(lines) + kept.rstrip("\n") + "\n")


def _probe_fused_rms() -> None:
    paddle.seed(33)
    fused = FusedRMSNorm(HIDDEN)
    fused.eval()
    paddle.onnx.export(
        fused, "/tmp/lnfuse_probe_fused_rms", input_spec=_spec(None, SEQ, HIDDEN), opset_version=13
    )
    sys.exit(0 if Path("/tmp/lnfuse_probe_fused_rms.onnx").exists() else 3)


def main() -> None:
    if sys.argv[1:] == ["--probe-fused-rms"]:
        _probe_fused_rms()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    steps: list[Callable[[], None]] = [export_encoders, export_layernorms, export_rmsnorms, export_lookalikes]
    only = set(sys.argv[1:])
    for step in steps:
        if only and step.__name__ not in only:
            continue
        try:
            step()
        except Exception:
            FAILURES.append((step.__name__, traceback.format_exc().splitlines()[-1][:300]))
    for r in RESULTS:
        print(f"{r['name']}: opset {r['opset']} nodes {r['nodes']} err {r['err']:.2e} LN-op {r['ln_op']}")
    for name, why in FAILURES:
        print(f"FAILED {name}: {why}")
    if not only:
        _write_readme()


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    main()
