"""Synthetic models for the scale benchmark: long chains of decomposed LayerNorm blocks, a deep transformer.

Importable (``from benchmarks.gen_chain import build_chain``) by ``benchmarks/bench_scale.py`` and by
``tests/test_scale_small.py``; also a script::

    python benchmarks/gen_chain.py chain 1000 chain_1k.onnx
    python benchmarks/gen_chain.py transformer 48 transformer_48.onnx

* :func:`build_chain` ``(n_blocks)``: ``n_blocks`` blocks on ``x: [B, S, H]`` (default ``[1, 8, 64]``),
  each the PyTorch-export LayerNorm chain (ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div,
  Mul gamma, Add beta; 9 nodes) with its own gamma/beta initializers, followed by ``Add(const)`` and
  ``Relu`` so the blocks chain: 11 nodes per block (1,000 blocks = 11,000 nodes, 10,000 = 110,000).
  The exponent 2.0 and eps are shared scalar initializers, the per-block Add constant is one shared
  ``[H]`` initializer, so the file size is dominated by the gamma/beta tensors.
* :func:`build_transformer` ``(n_layers)``: a pre-LN transformer, each layer
  ``x + Attn(LN1(x))`` then ``h + MLP(LN2(h))`` (single-head attention: Q/K/V MatMuls, Transpose,
  MatMul, scale, Softmax, MatMul, output projection; MLP: MatMul, Relu, MatMul), plus a final LN.
  ``2 * n_layers + 1`` decomposed LNs.

Every builder returns a :class:`Generated`: the model (opset 17, IR 8, checker clean) and the number of
LayerNorms an optimizer must fuse in it. :func:`reference_chain` computes the chain's output in float64
numpy for numeric checks that do not need ONNX Runtime.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Generated",
    "build_chain",
    "build_transformer",
    "chain_params",
    "ln_nodes",
    "make_input",
    "reference_chain",
]

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14 by default
EPS = 1e-5


@dataclass(frozen=True)
class Generated:
    """A synthetic model and how many decomposed LayerNorms it holds."""

    model: onnx.ModelProto
    expected_ln: int
    description: str


def chain_params(n_blocks: int, H: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gammas [n, H], betas [n, H], shift [H])`` float32, seeded: what :func:`build_chain` bakes in."""
    rng = np.random.default_rng(seed)
    gammas = (1.0 + 0.2 * rng.standard_normal((n_blocks, H))).astype(np.float32)
    betas = (0.1 * rng.standard_normal((n_blocks, H))).astype(np.float32)
    shift = (0.1 * rng.standard_normal(H)).astype(np.float32)
    return gammas, betas, shift


def ln_nodes(
    nodes: list[onnx.NodeProto], x: str, prefix: str, gamma: str, beta: str, two: str, eps: str
) -> str:
    """Append the 9-node torch.onnx LayerNorm chain over the last axis; returns its output name."""

    def node(op: str, inputs: list[str], tag: str, **attrs: object) -> str:
        out = f"{prefix}/{tag}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{prefix}/{tag}", **attrs))
        return out

    mean = node("ReduceMean", [x], "ReduceMean", axes=[-1], keepdims=1)
    d = node("Sub", [x, mean], "Sub")
    sq = node("Pow", [d, two], "Pow")
    var = node("ReduceMean", [sq], "ReduceMean_1", axes=[-1], keepdims=1)
    ve = node("Add", [var, eps], "Add")
    std = node("Sqrt", [ve], "Sqrt")
    norm = node("Div", [d, std], "Div")
    scaled = node("Mul", [norm, gamma], "Mul")
    return node("Add", [scaled, beta], "Add_1")


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int], name: str, out: str
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="lnfuse.benchmarks",
    )


def _scalar_inits() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.asarray(2.0, np.float32), "pow_two"),
        numpy_helper.from_array(np.asarray(EPS, np.float32), "ln_eps"),
    ]


def build_chain(n_blocks: int, B: int = 1, S: int = 8, H: int = 64, seed: int = 0) -> Generated:
    """``n_blocks`` x (decomposed LN + Add const + Relu) on ``x: [B, S, H]``; output ``y``."""
    if n_blocks < 1:
        raise ValueError("n_blocks must be >= 1")
    gammas, betas, shift = chain_params(n_blocks, H, seed)
    inits = [*_scalar_inits(), numpy_helper.from_array(shift, "shift")]
    nodes: list[onnx.NodeProto] = []
    cur = "x"
    for i in range(n_blocks):
        g_name, b_name = f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"
        inits.append(numpy_helper.from_array(gammas[i], g_name))
        inits.append(numpy_helper.from_array(betas[i], b_name))
        ln = ln_nodes(nodes, cur, f"/blocks.{i}/norm", g_name, b_name, "pow_two", "ln_eps")
        shifted = f"/blocks.{i}/Add_output_0"
        nodes.append(helper.make_node("Add", [ln, "shift"], [shifted], name=f"/blocks.{i}/Add"))
        cur = "y" if i == n_blocks - 1 else f"/blocks.{i}/Relu_output_0"
        nodes.append(helper.make_node("Relu", [shifted], [cur], name=f"/blocks.{i}/Relu"))
    model = _model(nodes, inits, [B, S, H], f"ln_chain_{n_blocks}", "y")
    return Generated(model, n_blocks, f"chain of {n_blocks} LN blocks, {len(nodes)} nodes, x[{B},{S},{H}]")


def reference_chain(x: np.ndarray, n_blocks: int, H: int = 64, seed: int = 0) -> np.ndarray:
    """Float64 numpy output of :func:`build_chain` (same seed and sizes) for input ``x``."""
    gammas, betas, shift = chain_params(n_blocks, H, seed)
    eps = float(np.float32(EPS))
    h = np.asarray(x, np.float64)
    for i in range(n_blocks):
        mean = h.mean(-1, keepdims=True)
        d = h - mean
        var = (d * d).mean(-1, keepdims=True)
        h = d / np.sqrt(var + eps) * gammas[i].astype(np.float64) + betas[i].astype(np.float64)
        h = np.maximum(h + shift.astype(np.float64), 0.0)
    return h


def build_transformer(n_layers: int = 48, B: int = 1, S: int = 16, H: int = 64, seed: int = 0) -> Generated:
    """A pre-LN transformer of ``n_layers`` layers (2 decomposed LNs each) plus a final LN; output ``y``."""
    rng = np.random.default_rng(seed)
    inits = _scalar_inits()
    inits.append(numpy_helper.from_array(np.asarray(1.0 / math.sqrt(H), np.float32), "attn_scale"))
    nodes: list[onnx.NodeProto] = []

    def w(name: str, rows: int, cols: int) -> str:
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(np.float32), name
            )
        )
        return name

    def affine(prefix: str) -> tuple[str, str]:
        g, b = f"{prefix}.weight", f"{prefix}.bias"
        inits.append(numpy_helper.from_array((1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32), g))
        inits.append(numpy_helper.from_array((0.05 * rng.standard_normal(H)).astype(np.float32), b))
        return g, b

    def op(op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    cur = "x"
    for i in range(n_layers):
        p = f"/layers.{i}"
        g1, b1 = affine(f"layers.{i}.ln1")
        h = ln_nodes(nodes, cur, f"{p}/ln1", g1, b1, "pow_two", "ln_eps")
        q = op("MatMul", [h, w(f"layers.{i}.attn.q", H, H)], f"{p}/attn/q/MatMul")
        k = op("MatMul", [h, w(f"layers.{i}.attn.k", H, H)], f"{p}/attn/k/MatMul")
        v = op("MatMul", [h, w(f"layers.{i}.attn.v", H, H)], f"{p}/attn/v/MatMul")
        kt = op("Transpose", [k], f"{p}/attn/Transpose", perm=[0, 2, 1])
        s = op("MatMul", [q, kt], f"{p}/attn/MatMul")
        s = op("Mul", [s, "attn_scale"], f"{p}/attn/Mul")
        a = op("Softmax", [s], f"{p}/attn/Softmax", axis=-1)
        a = op("MatMul", [a, v], f"{p}/attn/MatMul_1")
        a = op("MatMul", [a, w(f"layers.{i}.attn.o", H, H)], f"{p}/attn/o/MatMul")
        cur = op("Add", [cur, a], f"{p}/Add")
        g2, b2 = affine(f"layers.{i}.ln2")
        h = ln_nodes(nodes, cur, f"{p}/ln2", g2, b2, "pow_two", "ln_eps")
        m = op("MatMul", [h, w(f"layers.{i}.mlp.fc1", H, 2 * H)], f"{p}/mlp/fc1/MatMul")
        m = op("Relu", [m], f"{p}/mlp/Relu")
        m = op("MatMul", [m, w(f"layers.{i}.mlp.fc2", 2 * H, H)], f"{p}/mlp/fc2/MatMul")
        cur = op("Add", [cur, m], f"{p}/Add_1")
    gf, bf = affine("final_norm")
    ln_nodes(nodes, cur, "/final_norm", gf, bf, "pow_two", "ln_eps")
    # Name the graph output "y".
    nodes[-1].output[0] = "y"
    model = _model(nodes, inits, [B, S, H], f"transformer_{n_layers}", "y")
    return Generated(
        model, 2 * n_layers + 1, f"pre-LN transformer, {n_layers} layers, {len(nodes)} nodes, x[{B},{S},{H}]"
    )


def make_input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feed for the (static-shaped, float32) input ``x``: normal(mean 0.5, std 1)."""
    (inp,) = model.graph.input
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return {inp.name: (rng.standard_normal(shape) + 0.5).astype(np.float32)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["chain", "transformer"])
    ap.add_argument("n", type=int, help="blocks (chain) or layers (transformer)")
    ap.add_argument("output")
    args = ap.parse_args(argv)
    gen = build_chain(args.n) if args.kind == "chain" else build_transformer(args.n)
    onnx.save(gen.model, args.output)
    print(f"{args.output}: {gen.description}, {gen.expected_ln} LayerNorms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
