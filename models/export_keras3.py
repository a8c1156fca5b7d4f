"""Export real Keras 3 models (TensorFlow backend) into ``models/exported/keras3/``.

Keras 3, TensorFlow and tf2onnx are *not* dependencies of lnfuse, and the tests
never import this script.  Run it by hand from the repository root in its own
environment (the same one as ``models/export_tf.py`` works: tensorflow-cpu 2.21
installs Keras 3 as a dependency; exact versions in
``models/exported/keras3/README.md``)::

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1 tf2onnx==1.17.0 \
        "onnx==1.23.*" onnxruntime numpy
    /tmp/tfvenv/bin/python models/export_keras3.py

Every model is built from Keras 3 layers with seeded random weights and written
with Keras 3's own exporter, ``model.export(path, format="onnx")``, at its
default opset (the exporter passes ``opset=None`` to
``tf2onnx.convert.from_function``, which then uses tf2onnx's preferred opset,
15).  Each file is re-saved with ``ir_version`` clamped to at most 10 (tf2onnx
writes 8 at opset 15), checked with the full ONNX checker, run on onnxruntime
CPU with all graph optimizations disabled, and compared with the Keras output.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from keras import layers, ops

OUT_DIR = Path(__file__).resolve().parent / "exported" / "keras3"
MAX_IR = 10

RESULTS: list[tuple[str, int, int, float]] = []  # name, opset, written IR, max abs err


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _seed(n: int) -> np.random.Generator:
    keras.backend.clear_session()
    keras.utils.set_random_seed(n)
    return np.random.default_rng(n)


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial gamma/beta/scale (and BN moving stats) so numeric checks mean something."""
    for w in model.weights:
        name = w.path.split("/")[-1]
        shape = tuple(w.shape)
        if name in ("gamma", "scale"):
            w.assign(1.0 + 0.1 * rng.standard_normal(shape).astype("float32"))
        elif name == "beta":
            w.assign(0.1 * rng.standard_normal(shape).astype("float32"))
        elif name == "moving_mean":
            w.assign(0.2 * rng.standard_normal(shape).astype("float32"))
        elif name == "moving_variance":
            w.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))


def _finalize(path: Path) -> tuple[int, int]:
    proto = onnx.load(str(path))
    written_ir = proto.ir_version
    if proto.ir_version > MAX_IR:
        proto.ir_version = MAX_IR
    proto.producer_name = f"lnfuse-fixtures/keras-{keras.__version__}-tf2onnx-{tf2onnx.__version__}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return written_ir, opset


def _ort_check(path: Path, sample: np.ndarray, expected: np.ndarray) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: sample})
    return float(np.max(np.abs(got - expected)))


def _export(model: keras.Model, name: str, sample: np.ndarray) -> None:
    """``model.export(format="onnx")`` at the default opset, check, and record the error."""
    path = OUT_DIR / f"{name}.onnx"
    expected = np.asarray(model(sample, training=False))
    try:
        model.export(str(path), format="onnx", verbose=False)
        ir, opset = _finalize(path)
        err = _ort_check(path, sample, expected)
    except Exception as exc:
        print(f"  FAILED   {path.name}: {type(exc).__name__}: {str(exc)[:300]}")
        RESULTS.append((name, 0, -1, float("nan")))
        path.unlink(missing_ok=True)
        return
    RESULTS.append((name, opset, ir, err))
    print(
        f"  ok       {path.name}: opset {opset}, IR {ir}, {path.stat().st_size} B, max|ort-keras| = {err:.2e}"
    )


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype("float32")


SEQ, HID = 6, 16


# ----------------------------------------------------------------------------
# 1. Transformer block (pre-LN, MultiHeadAttention)
# ----------------------------------------------------------------------------


def export_transformer() -> None:
    rng = _seed(101)
    x = keras.Input((SEQ, HID), name="x")
    h = layers.LayerNormalization(name="ln1")(x)
    h = x + layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    m = layers.LayerNormalization(name="ln2")(h)
    # relu, not gelu: TF's exact gelu uses Erfc, which has no ONNX op.
    m = layers.Dense(HID, name="fc2")(layers.Dense(2 * HID, activation="relu", name="fc1")(m))
    y = layers.LayerNormalization(name="ln_f")(h + m)
    model = keras.Model(x, y)
    _randomize(model, rng)
    _export(model, "k3_transformer_preln", _rand(rng, 2, SEQ, HID))


# ----------------------------------------------------------------------------
# 2. LN-LSTM cell, unrolled and looped
# ----------------------------------------------------------------------------

RNN_IN, RNN_H, RNN_T = 8, 8, 6


class LNLSTMCell(layers.Layer):
    """gates = LN(x W_x) + LN(h W_h) + b;  h' = o * tanh(LN(c'))."""

    def __init__(self, units: int, **kw):
        super().__init__(**kw)
        self.units = units
        self.state_size = [units, units]
        self.output_size = units
        self.ln_x = layers.LayerNormalization(name="ln_x")
        self.ln_h = layers.LayerNormalization(name="ln_h")
        self.ln_c = layers.LayerNormalization(name="ln_c")

    def build(self, input_shape):
        d = int(input_shape[-1])
        u = self.units
        self.w_x = self.add_weight(name="w_x", shape=(d, 4 * u), initializer="glorot_uniform")
        self.w_h = self.add_weight(name="w_h", shape=(u, 4 * u), initializer="orthogonal")
        self.b = self.add_weight(name="b", shape=(4 * u,), initializer="random_normal")
        self.ln_x.build((None, 4 * u))
        self.ln_h.build((None, 4 * u))
        self.ln_c.build((None, u))

    def call(self, x, states):
        h, c = states
        z = self.ln_x(ops.matmul(x, self.w_x)) + self.ln_h(ops.matmul(h, self.w_h)) + self.b
        i, f, g, o = ops.split(z, 4, axis=-1)
        c_new = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h_new = ops.sigmoid(o) * ops.tanh(self.ln_c(c_new))
        return h_new, [h_new, c_new]


def export_ln_lstm() -> None:
    for unroll, name, seed in ((True, f"k3_ln_lstm_unrolled_T{RNN_T}", 102), (False, "k3_ln_lstm_loop", 103)):
        rng = _seed(seed)
        x = keras.Input((RNN_T, RNN_IN), name="x")
        y = layers.RNN(LNLSTMCell(RNN_H), return_sequences=True, unroll=unroll, name="rnn")(x)
        model = keras.Model(x, y)
        _randomize(model, rng)
        _export(model, name, _rand(rng, 2, RNN_T, RNN_IN))


# ----------------------------------------------------------------------------
# 3.-5. LayerNorm placements, RMSNormalization
# ----------------------------------------------------------------------------


def export_norm_layers() -> None:
    rng = _seed(104)
    x = keras.Input((8, 8, 3), name="x")
    y = layers.LayerNormalization(axis=-1, name="ln")(layers.Conv2D(8, 3, padding="same", name="conv")(x))
    model = keras.Model(x, y)
    _randomize(model, rng)
    _export(model, "k3_conv_nhwc_ln", _rand(rng, 2, 8, 8, 3))

    rng = _seed(105)
    x = keras.Input((SEQ, 8), name="x")
    model = keras.Model(x, layers.LayerNormalization(axis=[-2, -1], name="ln")(x))
    _randomize(model, rng)
    _export(model, "k3_ln_2axes", _rand(rng, 2, SEQ, 8))

    if hasattr(layers, "RMSNormalization"):
        rng = _seed(106)
        x = keras.Input((SEQ, HID), name="x")
        h = layers.Dense(HID, name="fc")(x)
        model = keras.Model(x, layers.RMSNormalization(name="rms")(h))
        _randomize(model, rng)
        _export(model, "k3_rmsnorm", _rand(rng, 2, SEQ, HID))
    else:  # pragma: no cover - Keras < 3.9
        print("  skipped  k3_rmsnorm: keras.layers.RMSNormalization does not exist")


# ----------------------------------------------------------------------------
# 6. Look-alikes
# ----------------------------------------------------------------------------


def export_lookalikes() -> None:
    rng = _seed(110)
    x = keras.Input((4, 4, 8), name="x")
    h = layers.BatchNormalization(name="bn4d")(x)
    h = layers.Reshape((16, 8))(h)
    model = keras.Model(x, layers.BatchNormalization(name="bn3d")(h))
    _randomize(model, rng)
    _export(model, "k3_batchnorm_inference", _rand(rng, 2, 4, 4, 8))

    rng = _seed(111)
    x = keras.Input((4, 4, 8), name="x")
    model = keras.Model(x, layers.GroupNormalization(groups=2, name="gn")(x))
    _randomize(model, rng)
    _export(model, "k3_groupnorm", _rand(rng, 2, 4, 4, 8))

    rng = _seed(112)
    x = keras.Input((SEQ, HID), name="x")
    model = keras.Model(x, layers.UnitNormalization(axis=-1, name="unit")(x))
    _export(model, "k3_unitnorm", _rand(rng, 2, SEQ, HID))


# ----------------------------------------------------------------------------


def main() -> int:
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(
        f"keras {keras.__version__} (backend {keras.backend.backend()}), tensorflow {tf.__version__}, "
        f"tf2onnx {tf2onnx.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}"
    )
    steps: list[Callable[[], None]] = [
        export_transformer,
        export_ln_lstm,
        export_norm_layers,
        export_lookalikes,
    ]
    only = set(sys.argv[1:])
    for step in steps:
        if only and step.__name__ not in only:
            continue
        print(step.__name__)
        step()
    failed = [r for r in RESULTS if r[2] < 0 or not r[3] <= 1e-4]
    print(f"{len(RESULTS) - len(failed)} ok, {len(failed)} failed or off by > 1e-4")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
