"""ONNX's own function bodies of LayerNormalization and RMSNormalization, expanded as onnx's backend
tests expand them (``onnx.backend.test.case.node.function_testcase_helper``: the schema's
context-dependent function for the node, inlined with prefixed names).

``python -m models.function_bodies`` writes ``models/fixtures/function_bodies/*.onnx``: for every axis of
a rank-4 input, LayerNormalization's opset-17 body (Reduce* axes as attributes) and opset-18 body
(axes as inputs), with Y, Mean and InvStdDev all graph outputs (Mean / InvStdDev reshaped to a shape
computed at run time from Shape / Size / Slice / Sub / ConstantOfShape / Concat), and
RMSNormalization's opset-23 body (axes from Shape -> Size -> Range) for every axis. Scale and B are
initializers (``weights="init"``) or graph inputs (``weights="input"``, as in onnx's backend tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.backend.test.case.node as onnx_cases
from onnx import TensorProto, helper, numpy_helper

SHAPE = (2, 3, 4, 5)
EPS = 1e-5
OUT_DIR = Path(__file__).resolve().parent / "fixtures" / "function_bodies"
IR_VERSION = {17: 8, 18: 8, 23: 11}


def _weights(nshape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.2 * rng.standard_normal(nshape)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(nshape)).astype(np.float32)
    return gamma, beta


def expanded(op: str, opset: int, axis: int, weights: str = "init", outputs: int = 3) -> onnx.ModelProto:
    """The model onnx's backend tests call ``test_<op>_..._expanded``: the op's function body inlined."""
    rank = len(SHAPE)
    nshape = SHAPE[axis % rank :]
    names = ["X", "W", "B"] if op == "LayerNormalization" else ["X", "W"]
    outs = ["Y", "Mean", "InvStdDev"][:outputs] if op == "LayerNormalization" else ["Y"]
    node = helper.make_node(op, names, outs, axis=axis, epsilon=EPS)
    infos = [helper.make_tensor_value_info("X", TensorProto.FLOAT, SHAPE)]
    infos += [helper.make_tensor_value_info(n, TensorProto.FLOAT, nshape) for n in names[1:]]
    opsets = [helper.make_opsetid("", opset)]
    bodies, _ = onnx_cases.function_testcase_helper(node, [i.type for i in infos], "fn", opsets)
    # One body per function version of the schema; take the one written for this opset.
    nodes = _body_for(bodies, opset)
    gamma, beta = _weights(nshape, seed=opset * 10 + axis % rank)
    inits = []
    graph_inputs = [infos[0]]
    if weights == "init":
        inits = [numpy_helper.from_array(a, n) for a, n in zip((gamma, beta), names[1:], strict=False)]
    else:
        graph_inputs += infos[1:]
    reduced = list(SHAPE[: axis % rank]) + [1] * (rank - axis % rank)
    out_infos = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, SHAPE)]
    out_infos += [helper.make_tensor_value_info(n, TensorProto.FLOAT, reduced) for n in outs[1:]]
    graph = helper.make_graph(nodes, f"{op}_{opset}_axis{axis}", graph_inputs, out_infos, inits)
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=IR_VERSION[opset], producer_name="onnx-expand"
    )


def _body_for(bodies: list, opset: int) -> list[onnx.NodeProto]:
    """The expansion whose Reduce* ops match ``opset`` (axes attribute below 18, input from 18)."""
    for nodes, _ in bodies:
        reduces = [n for n in nodes if n.op_type == "ReduceMean"]
        attr_form = all(any(a.name == "axes" for a in n.attribute) for n in reduces)
        if (opset < 18) == attr_form:
            return list(nodes)
    return list(bodies[-1][0])


def cases() -> dict[str, onnx.ModelProto]:
    out: dict[str, onnx.ModelProto] = {}
    rank = len(SHAPE)
    for opset in (17, 18):
        for axis in range(-rank, rank):
            out[f"ln{opset}_axis{axis}"] = expanded("LayerNormalization", opset, axis)
        out[f"ln{opset}_axis-1_inputs"] = expanded("LayerNormalization", opset, -1, weights="input")
        out[f"ln{opset}_axis-1_y_only"] = expanded("LayerNormalization", opset, -1, outputs=1)
    for axis in range(-rank, rank):
        out[f"rms23_axis{axis}"] = expanded("RMSNormalization", 23, axis)
    return out


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, model in cases().items():
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, OUT_DIR / f"{name}.onnx")
    print(f"wrote {len(cases())} models to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
