"""Which precision policy is closer to the exact LayerNorm? (issue #14; numbers in README).

For the two mixed-precision exports in ``models/exported/`` this runs, on the same seeded
``input_ids``:

* ``fp64``: the original with every float tensor, constant and Cast made float64, on ONNX
  Runtime CPU (the reference: the model's own weights, rounding ~1e-16);
* ``original``: the decomposed model as exported, on ONNX Runtime CPU (DISABLE_ALL);
* ``lnfuse``: ``lnfuse.optimize``'s result (the fused op computes its statistics in fp32);
* ``keep``: "keep the original's precision": each fused LN whose original rounds its
  normalized value through fp16 before an fp32 affine is rebuilt as LN(fp16, no affine) ->
  Cast fp32 -> Mul gamma -> Add beta (the original's rounding points, fp32 affine); for the
  all-fp16 model ``keep`` sets stash_type=10 (fp16 statistics) where ONNX Runtime accepts it;
* ``fp32 inside`` (all-fp16 model): every fused LN computed in fp32 between two Casts;
* ``fp32``: the head LN of the autocast model computed fully in fp32 (Cast the input up, fp32
  gamma/beta, no fp16 rounding at all).

It prints the max and RMS error against fp64 of every LN output and of the model output.
Run: ``python benchmarks/precision_policy.py`` (a few seconds, CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_gather_elements

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lnfuse  # noqa: E402

EXPORTED = ROOT / "models" / "exported"
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
HEAD = "/inner/cls/predictions/transform/LayerNorm"


def _gather_elements(self, data, indices, axis=None):  # type: ignore[no-untyped-def]
    """np.take_along_axis: onnx 1.23's reference GatherElements fails on BERT's broadcast index."""
    axis = 0 if axis is None else axis
    idx = np.where(indices < 0, indices + data.shape[axis], indices)
    return (np.take_along_axis(data, idx, axis=axis),)


def _reference(model: onnx.ModelProto) -> ReferenceEvaluator:
    op_gather_elements.GatherElements._run = _gather_elements  # this script's process only
    return ReferenceEvaluator(model)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.value_info[:]
    for init in g.initializer:
        if init.data_type in FLOATS:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for v in (*g.input, *g.output):
        if v.type.tensor_type.elem_type in FLOATS:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.i in FLOATS:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOATS:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64)))
    return m


def expose(model: onnx.ModelProto, names: list[str], types: dict[str, int]) -> onnx.ModelProto:
    """A copy with ``names`` (those the model produces) as extra outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    made = {t for n in m.graph.node for t in n.output}
    for name in names:
        if name not in have and name in made:
            m.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    return m


def run_ort(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))


def ln_outputs(original: onnx.ModelProto) -> list[str]:
    """The tensor each decomposed LN ends in (its bias Add), named as the exporter wrote it."""
    return [
        n.output[0] for n in original.graph.node if n.op_type == "Add" and n.name.endswith("LayerNorm/Add_1")
    ]


def keep_precision_head(fused: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Rebuild the head LN as LN(fp16, no affine) -> Cast fp32 -> fp32 affine (the original's roundings)."""
    m = onnx.ModelProto()
    m.CopyFrom(fused)
    g = m.graph
    idx, ln = next(
        (i, n) for i, n in enumerate(g.node) if n.op_type == "LayerNormalization" and "_5" in n.output[0]
    )
    cast = g.node[idx + 1]
    out = cast.output[0]
    width = 32
    g.initializer.append(numpy_helper.from_array(np.ones(width, np.float16), "keep_ones"))
    new = [
        helper.make_node(
            "LayerNormalization",
            [ln.input[0], "keep_ones"],
            ["keep_n16"],
            axis=-1,
            epsilon=helper.get_attribute_value(ln.attribute[1])
            if ln.attribute[1].name == "epsilon"
            else 1e-12,
            stash_type=1,
        ),
        helper.make_node("Cast", ["keep_n16"], ["keep_n32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["keep_n32", "inner.cls.predictions.transform.LayerNorm.weight"], ["keep_m"]),
        helper.make_node("Add", ["keep_m", "inner.cls.predictions.transform.LayerNorm.bias"], [out]),
    ]
    _copy_inits(
        g,
        original,
        [
            "inner.cls.predictions.transform.LayerNorm.weight",
            "inner.cls.predictions.transform.LayerNorm.bias",
        ],
    )
    g.node.remove(cast)
    g.node.remove(ln)
    for k, n in enumerate(new):
        g.node.insert(idx + k, n)
    return m


def fp32_head(fused: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The head LN fully in fp32: Cast the fp16 input up, fp32 gamma/beta, fp32 output."""
    m = onnx.ModelProto()
    m.CopyFrom(fused)
    g = m.graph
    idx, ln = next(
        (i, n) for i, n in enumerate(g.node) if n.op_type == "LayerNormalization" and "_5" in n.output[0]
    )
    cast = g.node[idx + 1]
    w, b = (
        "inner.cls.predictions.transform.LayerNorm.weight",
        "inner.cls.predictions.transform.LayerNorm.bias",
    )
    _copy_inits(g, original, [w, b])
    eps = next(a.f for a in ln.attribute if a.name == "epsilon")
    new = [
        helper.make_node("Cast", [ln.input[0]], ["f32_x"], to=TensorProto.FLOAT),
        helper.make_node(
            "LayerNormalization", ["f32_x", w, b], [cast.output[0]], axis=-1, epsilon=eps, stash_type=1
        ),
    ]
    g.node.remove(cast)
    g.node.remove(ln)
    for k, n in enumerate(new):
        g.node.insert(idx + k, n)
    return m


def fp32_inside(fused: onnx.ModelProto) -> onnx.ModelProto:
    """Every fp16 LayerNormalization computed in fp32: Cast in, fp32 Scale/B, Cast the result to fp16."""
    m = onnx.ModelProto()
    m.CopyFrom(fused)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for k, n in enumerate(g.node):
        if n.op_type != "LayerNormalization" or inits[n.input[1]].data_type != TensorProto.FLOAT16:
            nodes.append(n)
            continue
        ins = [f"f32_in_{k}"]
        for name in n.input[1:]:
            value = numpy_helper.to_array(inits[name]).astype(np.float32)
            g.initializer.append(numpy_helper.from_array(value, f"{name}_f32_{k}"))
            ins.append(f"{name}_f32_{k}")
        nodes.append(helper.make_node("Cast", [n.input[0]], ins[:1], to=TensorProto.FLOAT))
        ln = helper.make_node("LayerNormalization", ins, [f"f32_out_{k}"])
        ln.attribute.extend(n.attribute)
        nodes.append(ln)
        nodes.append(helper.make_node("Cast", [f"f32_out_{k}"], [n.output[0]], to=TensorProto.FLOAT16))
    del g.node[:]
    g.node.extend(nodes)
    return m


def _copy_inits(g: onnx.GraphProto, original: onnx.ModelProto, names: list[str]) -> None:
    have = {i.name for i in g.initializer}
    for init in original.graph.initializer:
        if init.name in names and init.name not in have:
            g.initializer.append(init)


def fp16_stash(fused: onnx.ModelProto) -> onnx.ModelProto | None:
    m = onnx.ModelProto()
    m.CopyFrom(fused)
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            for a in n.attribute:
                if a.name == "stash_type":
                    a.i = TensorProto.FLOAT16
    try:
        run_ort(m, {"input_ids": np.zeros((1, 4), np.int64)})
    except Exception as err:
        print(f"  (stash_type=10 rejected by ONNX Runtime: {str(err).splitlines()[0][:120]})")
        return None
    return m


def report(name: str, variants: dict[str, onnx.ModelProto], original: onnx.ModelProto) -> None:
    outs = [o.name for o in original.graph.output]
    lns = ln_outputs(original)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 100, size=(4, 16)).astype(np.int64)}
    ref_model = expose(to_float64(original), lns, dict.fromkeys(lns, TensorProto.DOUBLE))
    ref_names = [o.name for o in ref_model.graph.output]
    ref = dict(zip(ref_names, _reference(ref_model).run(None, feed), strict=True))
    print(f"\n{name}: max abs error (RMS) against the fp64 reference, input_ids 4x16")
    cols = list(variants)
    print("  " + "tensor".ljust(60) + "".join(c.rjust(24) for c in cols))
    types = _types(original)
    got = {c: run_ort(expose(m, lns, types), feed) for c, m in variants.items()}
    for t in [*lns, *outs]:
        cells = []
        for c in cols:
            if t not in got[c]:
                cells.append("(fused away)")
                continue
            d = got[c][t].astype(np.float64) - ref[t]
            cells.append(f"{np.max(np.abs(d)):.2e} ({np.sqrt(np.mean(d * d)):.2e})")
        print("  " + t[-60:].ljust(60) + "".join(s.rjust(24) for s in cells))


def _types(original: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(original).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}


def main() -> None:
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    auto = onnx.load(str(EXPORTED / "bert_tiny_mlm_autocast_fp16_opset14.onnx"))
    fused = lnfuse.optimize(auto).model
    report(
        "autocast fp16 (bert_tiny_mlm_autocast_fp16_opset14)",
        {
            "original": auto,
            "lnfuse": fused,
            "keep": keep_precision_head(fused, auto),
            "fp32": fp32_head(fused, auto),
        },
        auto,
    )
    half = onnx.load(str(EXPORTED / "bert_tiny_fp16_keepio_opset14.onnx"))
    fused_h = lnfuse.optimize(half).model
    variants = {"original": half, "lnfuse": fused_h}
    stash16 = fp16_stash(fused_h)
    if stash16 is not None:
        variants["keep (stash fp16)"] = stash16
    variants["fp32 inside"] = fp32_inside(fused_h)
    report("onnxconverter-common fp16 (bert_tiny_fp16_keepio_opset14)", variants, half)


if __name__ == "__main__":
    main()
