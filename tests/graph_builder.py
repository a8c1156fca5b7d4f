"""What the property-based suites share: a builder of nodes and initializers, a seeded feed for a
model's inputs, and a run on ONNX Runtime.

Each suite keeps a generator of its own (what it builds and why); only these mechanics are common.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


class GraphBuilder:
    """The nodes and initializers of a graph written in code. Every node (``n<k>_<op>``, outputs
    ``t<k>_<i>``) and initializer (``c<k>``) is named by one counter, so no two collide."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        """Append ``op_type(inputs)``; its output names."""
        self.count += 1
        outs = [f"t{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self.count}_{op_type}", **attrs))
        return outs

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A new initializer holding ``value``; its name."""
        self.count += 1
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"c{self.count}"))
        return f"c{self.count}"


def run_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model`` on ONNX Runtime's CPU provider with graph optimizations off (its own fusions must
    not stand in for lnfuse's), one thread, quiet."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def random_feed(model: onnx.ModelProto, seed: int = 0, loc: float = 0.5) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input that is not an initializer: floats ``normal(loc, 1)``,
    other types 0 or 1; a dim without a fixed size is 2."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feed[i.name] = rng.normal(loc, 1.0, size=shape).astype(dtype)
        else:
            feed[i.name] = rng.integers(0, 2, shape).astype(dtype)
    return feed
