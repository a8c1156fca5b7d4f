"""Export real JAX/Flax models with LayerNorm / RMSNorm into ``models/exported/jax/``.

This script needs JAX, Flax and jax2onnx, which are *not* dependencies of
lnfuse.  Run it by hand from the repository root in a separate environment (see
``models/exported/jax/README.md``)::

    python3 -m venv /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install jax==0.10.2 flax==0.12.8 jax2onnx==0.17.1 onnx onnxruntime
    /tmp/jaxvenv/bin/python models/export_jax.py

Models are written with ``flax.nnx`` (and ``flax.linen`` where nnx has no direct
spelling), exported the way jax2onnx users do it,
``jax2onnx.to_onnx(model, [("B", 5, 16)], opset=N)`` with its default
``normalization_mode="auto"`` (explicit decomposed graphs); one file per norm
shows ``normalization_mode="prefer_native"``.  jax2onnx's default opset is 23.
Tiny dims (hidden 16), fixed seeds, norm gains/biases randomised so numeric
checks mean something.  Each file is checked with ``onnx.checker`` and run on
onnxruntime (CPU, ``ORT_DISABLE_ALL``) against the JAX output; the results and
versions go into the README.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from flax import linen, nnx
from jax2onnx import to_onnx

OUT_DIR = Path(__file__).resolve().parent / "exported" / "jax"
HIDDEN = 16
SEQ = 5
MAX_IR = 10

RESULTS: list[dict[str, Any]] = []
FAILURES: list[tuple[str, str]] = []


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _randomize_norms(module: Any, seed: int, scale: float = 0.1) -> None:
    """Give every nnx norm gain/bias a non-trivial value (1 + s*N, s*N)."""
    rng = np.random.default_rng(seed)
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm)):
            if getattr(sub, "scale", None) is not None:
                s = sub.scale.value
                sub.scale.value = jnp.asarray(1.0 + scale * rng.standard_normal(s.shape), s.dtype)
            if getattr(sub, "bias", None) is not None:
                b = sub.bias.value
                sub.bias.value = jnp.asarray(scale * rng.standard_normal(b.shape), b.dtype)
        if isinstance(sub, nnx.BatchNorm):
            m = sub.mean.value
            sub.mean.value = jnp.asarray(0.1 * rng.standard_normal(m.shape), m.dtype)
            sub.var.value = jnp.asarray(1.0 + 0.2 * rng.random(m.shape), m.dtype)


def _linen_randomize(params: Any, seed: int, scale: float = 0.1) -> Any:
    rng = np.random.default_rng(seed)

    def one(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        name = str(path[-1])
        if "scale" in name:
            return jnp.asarray(1.0 + scale * rng.standard_normal(leaf.shape), leaf.dtype)
        if "bias" in name:
            return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(one, params)


def _x(*shape: int, seed: int = 0, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _export(
    fn: Callable[..., Any],
    name: str,
    spec: tuple[Any, ...],
    x: np.ndarray,
    opset: int,
    what: str,
    **kwargs: Any,
) -> None:
    """to_onnx, clamp IR, check, save, run on ORT against JAX; record the result."""
    path = OUT_DIR / f"{name}.onnx"
    if path.exists():
        path.unlink()
    try:
        if x.dtype == np.float16:
            spec_arg: Any = jax.ShapeDtypeStruct(tuple(spec), jnp.float16)
        else:
            spec_arg = spec
        proto = to_onnx(fn, [spec_arg], model_name=name, opset=opset, input_names=["x"], **kwargs)
    except Exception as err:
        FAILURES.append((name, f"{type(err).__name__}: {err}".splitlines()[0][:300]))
        return
    ir_written = proto.ir_version
    if proto.ir_version > MAX_IR:
        proto.ir_version = MAX_IR
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

    ref = np.asarray(fn(jnp.asarray(x)))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    RESULTS.append(
        {
            "name": name,
            "opset": opset_written,
            "ir_written": ir_written,
            "ir": proto.ir_version,
            "what": what,
            "err": err,
            "nodes": len(proto.graph.node),
            "kb": path.stat().st_size / 1024,
            "native": ops.get("LayerNormalization", 0) + ops.get("RMSNormalization", 0),
            "in_dtype": sess.get_inputs()[0].type,
            "functions": len(proto.functions),
        }
    )


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


class EncoderBlock(nnx.Module):
    """Transformer encoder layer: self-attention + GELU MLP, post- or pre-norm."""

    def __init__(self, dim: int, heads: int, pre_norm: bool, rngs: nnx.Rngs) -> None:
        self.pre_norm = pre_norm
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, qkv_features=dim, decode=False, dropout_rate=0.0, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), deterministic=True)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, deterministic=True))
        return self.ln2(x + self.mlp(x))


def export_encoders() -> None:
    for pre, tag in ((False, "postnorm"), (True, "prenorm")):
        block = EncoderBlock(HIDDEN, 2, pre, nnx.Rngs(10 + int(pre)))
        _randomize_norms(block, 10 + int(pre))
        _export(
            block,
            f"jax_nnx_encoder_{tag}_opset23",
            ("B", SEQ, HIDDEN),
            _x(2, SEQ, HIDDEN, seed=10),
            23,
            f"flax.nnx encoder block ({tag}): `nnx.LayerNorm` x2, `nnx.MultiHeadAttention(2 heads)`, "
            f"Linear-GELU-Linear MLP; x [B, {SEQ}, {HIDDEN}]",
        )


def export_layernorms() -> None:
    for opset in (13, 17, 18, 23):
        ln = nnx.LayerNorm(HIDDEN, rngs=nnx.Rngs(opset))
        _randomize_norms(ln, opset)
        _export(
            ln,
            f"jax_nnx_layernorm_opset{opset}",
            ("B", SEQ, HIDDEN),
            _x(2, SEQ, HIDDEN, seed=opset),
            opset,
            f"`nnx.LayerNorm({HIDDEN})` (eps 1e-6, use_fast_variance=True default); x [B, {SEQ}, {HIDDEN}]",
        )
    ln = nnx.LayerNorm(HIDDEN, use_fast_variance=False, rngs=nnx.Rngs(1))
    _randomize_norms(ln, 1)
    _export(
        ln,
        "jax_nnx_layernorm_slowvar_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=1),
        23,
        "`nnx.LayerNorm(16, use_fast_variance=False)`: two-pass variance",
    )
    ln = nnx.LayerNorm(HIDDEN, rngs=nnx.Rngs(2))
    _randomize_norms(ln, 2)
    _export(
        ln,
        "jax_nnx_layernorm_native_opset17",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=2),
        17,
        '`nnx.LayerNorm(16)` with `normalization_mode="prefer_native"` (LayerNormalization written directly)',
        normalization_mode="prefer_native",
    )

    # Two trailing axes: linen infers the [S, H] parameter shape from the input.
    mod2 = linen.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))
    params2 = _linen_randomize(mod2.init(jax.random.PRNGKey(21), jnp.zeros((1, SEQ, HIDDEN))), 21)
    _export(
        lambda x: mod2.apply(params2, x),
        "jax_linen_layernorm_2d_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=21),
        23,
        "`linen.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))`: gain/bias [5, 16]",
    )
    mod1 = linen.LayerNorm()
    params1 = _linen_randomize(mod1.init(jax.random.PRNGKey(22), jnp.zeros((1, SEQ, HIDDEN))), 22)
    _export(
        lambda x: mod1.apply(params1, x),
        "jax_linen_layernorm_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=22),
        23,
        "`linen.LayerNorm()` over the last axis",
    )

    ln_na = nnx.LayerNorm(HIDDEN, use_scale=False, use_bias=False, rngs=nnx.Rngs(3))
    _export(
        ln_na,
        "jax_nnx_layernorm_noaffine_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=3),
        23,
        "`nnx.LayerNorm(16, use_scale=False, use_bias=False)`",
    )

    ln_h = nnx.LayerNorm(HIDDEN, dtype=jnp.float16, param_dtype=jnp.float16, rngs=nnx.Rngs(4))
    _randomize_norms(ln_h, 4)
    _export(
        ln_h,
        "jax_nnx_layernorm_fp16_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=4, dtype=np.float16),
        23,
        "`nnx.LayerNorm(16, dtype=float16, param_dtype=float16)`, fp16 input",
    )


def export_rmsnorms() -> None:
    rms = nnx.RMSNorm(HIDDEN, rngs=nnx.Rngs(31))
    _randomize_norms(rms, 31)
    _export(
        rms,
        "jax_nnx_rmsnorm_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=31),
        23,
        "`nnx.RMSNorm(16)` (eps 1e-6)",
    )
    _export(
        rms,
        "jax_nnx_rmsnorm_opset18",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=31),
        18,
        "`nnx.RMSNorm(16)` at opset 18",
    )
    _export(
        rms,
        "jax_nnx_rmsnorm_native_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=31),
        23,
        '`nnx.RMSNorm(16)` with `normalization_mode="prefer_native"` (RMSNormalization written directly)',
        normalization_mode="prefer_native",
    )
    modr = linen.RMSNorm()
    paramsr = _linen_randomize(modr.init(jax.random.PRNGKey(32), jnp.zeros((1, SEQ, HIDDEN))), 32)
    _export(
        lambda x: modr.apply(paramsr, x),
        "jax_linen_rmsnorm_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=32),
        23,
        "`linen.RMSNorm()`",
    )
    rms_h = nnx.RMSNorm(HIDDEN, dtype=jnp.float16, param_dtype=jnp.float16, rngs=nnx.Rngs(33))
    _randomize_norms(rms_h, 33)
    _export(
        rms_h,
        "jax_nnx_rmsnorm_fp16_opset23",
        ("B", SEQ, HIDDEN),
        _x(2, SEQ, HIDDEN, seed=33, dtype=np.float16),
        23,
        "`nnx.RMSNorm(16, dtype=float16, param_dtype=float16)`, fp16 input",
    )


def export_lookalikes() -> None:
    chans = 8
    img = ("B", 4, 4, chans)  # Flax is channels-last
    gn = nnx.GroupNorm(chans, num_groups=2, rngs=nnx.Rngs(41))
    _randomize_norms(gn, 41)
    _export(
        gn,
        "jax_nnx_groupnorm_opset23",
        img,
        _x(2, 4, 4, chans, seed=41),
        23,
        "`nnx.GroupNorm(8, num_groups=2)` on x [B, 4, 4, 8] (NHWC; must not become LayerNormalization)",
    )
    inorm = nnx.InstanceNorm(chans, rngs=nnx.Rngs(42))
    _randomize_norms(inorm, 42)
    _export(
        inorm,
        "jax_nnx_instancenorm_opset23",
        img,
        _x(2, 4, 4, chans, seed=42),
        23,
        "`nnx.InstanceNorm(8)` on x [B, 4, 4, 8] (NHWC)",
    )
    bn = nnx.BatchNorm(chans, use_running_average=True, rngs=nnx.Rngs(43))
    _randomize_norms(bn, 43)
    _export(
        bn,
        "jax_nnx_batchnorm_eval_opset23",
        img,
        _x(2, 4, 4, chans, seed=43),
        23,
        "`nnx.BatchNorm(8, use_running_average=True)` (eval), random running stats, x [B, 4, 4, 8]",
    )


def _write_readme() -> None:
    lines = [
        "# JAX / Flax exports",
        "",
        "Written by `models/export_jax.py` (run by hand, see its docstring) with",
        '`jax2onnx.to_onnx(model, [("B", 5, 16)], opset=N, input_names=["x"])`, jax2onnx defaults',
        '(`normalization_mode="auto"`, i.e. explicit decomposed norms) unless the file name says `native`.',
        "Random seeded init, hidden 16, batch dynamic (`B`).",
        "",
        f"Versions: jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}, "
        f"flax {flax.__version__}, jax2onnx {_jax2onnx_version()}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}.",
        "",
        f"IR version: jax2onnx writes IR {sorted({r['ir_written'] for r in RESULTS})} for every opset used here "
        f"(also opset 23), so no file needed clamping to <= {MAX_IR}; the script clamps if a newer jax2onnx "
        "writes more. `max abs err`: onnxruntime CPU (`ORT_DISABLE_ALL`) vs the JAX function on a normal "
        "input [2, 5, 16] (or [2, 4, 4, 8]); fp16 files are compared with JAX's fp16 output.",
        "",
        "| file | opset | IR | nodes | KB | input | max abs err | what |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        ir = f"{r['ir_written']}" if r["ir_written"] == r["ir"] else f"{r['ir_written']} -> {r['ir']}"
        lines.append(
            f"| `{r['name']}.onnx` | {r['opset']} | {ir} | {r['nodes']} | {r['kb']:.1f} | {r['in_dtype']} | "
            f"{r['err']:.2e} | {r['what']} |"
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


def _jax2onnx_version() -> str:
    from importlib.metadata import version

    return version("jax2onnx")


def main() -> None:
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
        print(f"{r['name']}: opset {r['opset']} nodes {r['nodes']} err {r['err']:.2e} native {r['native']}")
    for name, why in FAILURES:
        print(f"FAILED {name}: {why}")
    if not only:
        _write_readme()


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main()
