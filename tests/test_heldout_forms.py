"""Forms found in real exports during a held-out sweep (PyTorch TorchScript and dynamo exporters).

Each graph is rebuilt here with onnx.helper, node for node as the exporter wrote it, so the
tests need no PyTorch: duplicate Casts in a T5 fp16 RMSNorm, keepdims=0 statistics put back by
Unsqueeze or Reshape (dynamo's var / var_mean), an unbiased variance whose N comes from Shape,
two LayerNorms whose statistics the exporter merged, and centred inputs the RMS pass must leave.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import lnfuse
from lnfuse.protos import iter_nodes

H = 32
RNG = np.random.default_rng(7)


def _f(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value, dtype=dtype), name)


def _model(nodes, inits, opset, x_type=TP.FLOAT, x_shape=("B", "S", H), outputs=(("y", TP.FLOAT),)):  # type: ignore[no-untyped-def]
    g = h.make_graph(
        nodes,
        "heldout",
        [h.make_tensor_value_info("x", x_type, list(x_shape))],
        [h.make_tensor_value_info(n, t, list(x_shape)) for n, t in outputs],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8 if opset <= 17 else 10)
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m, full_check=True)
    return m


def _gb() -> list[onnx.TensorProto]:
    return [_f("g", RNG.normal(1, 0.2, H)), _f("b", RNG.normal(0, 0.2, H))]


def _ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in iter_nodes(m.graph))


def _equal(
    a: onnx.ModelProto, b: onnx.ModelProto, shape: tuple[int, ...], dtype=np.float32, rtol=1e-5
) -> None:  # type: ignore[no-untyped-def]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = {"x": RNG.normal(0.5, 1.0, shape).astype(dtype)}
    ra = ort.InferenceSession(a.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)
    rb = ort.InferenceSession(b.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)
    for u, v in zip(ra, rb, strict=True):
        u64, v64 = u.astype(np.float64), v.astype(np.float64)
        assert np.max(np.abs(u64 - v64)) <= rtol * max(1.0, float(np.max(np.abs(u64))))


@pytest.mark.needs_opset(23)
def test_t5_fp16_rmsnorm_with_duplicate_casts() -> None:
    nodes = [
        h.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT),
        h.make_node("Pow", ["xf", "two"], ["sq"]),
        h.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        h.make_node("Add", ["ms", "eps"], ["mse"]),
        h.make_node("Sqrt", ["mse"], ["r"]),
        h.make_node("Div", ["one", "r"], ["inv"]),
        h.make_node("Cast", ["x"], ["xf2"], to=TP.FLOAT),  # the exporter's second Cast of x
        h.make_node("Mul", ["xf2", "inv"], ["n"]),
        h.make_node("Cast", ["n"], ["n16"], to=TP.FLOAT16),
        h.make_node("Mul", ["w", "n16"], ["y"]),
    ]
    inits = [_f("two", 2.0), _f("eps", 1e-6), _f("one", 1.0), _f("w", RNG.normal(1, 0.2, H), np.float16)]
    m = _model(nodes, inits, 14, x_type=TP.FLOAT16, outputs=(("y", TP.FLOAT16),))
    assert not lnfuse.optimize(m).changed
    r = lnfuse.optimize(m, rmsnorm=True)
    assert _ops(r.model) == Counter({"RMSNormalization": 1})
    onnx.checker.check_model(r.model, full_check=True)
    _equal(m, r.model, (2, 3, H), np.float16, rtol=2e-2)


@pytest.mark.parametrize("restore", ["unsqueeze", "reshape"])
def test_keepdims0_statistics_put_back(restore: str) -> None:
    # dynamo's torch.var: ReduceSum(keepdims=0) / (N - 1), then Reshape to the keepdims shape.
    back = (
        h.make_node("Unsqueeze", ["var", "ax"], ["v"])
        if restore == "unsqueeze"
        else h.make_node("Reshape", ["var", "kshape"], ["v"])
    )
    nodes = [
        h.make_node("ReduceMean", ["x", "ax"], ["mean"], keepdims=1),
        h.make_node("ReduceMean", ["x", "ax"], ["m2"], keepdims=1),
        h.make_node("Sub", ["x", "m2"], ["d2"]),
        h.make_node("Mul", ["d2", "d2"], ["dd"]),
        h.make_node("ReduceSum", ["dd", "ax"], ["ssum"], keepdims=0),
        h.make_node("Div", ["ssum", "nm1"], ["var"]),
        back,
        h.make_node("Sub", ["x", "mean"], ["sub"]),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["sub", "sd"], ["n"]),
        h.make_node("Mul", ["n", "g"], ["ng"]),
        h.make_node("Add", ["ng", "b"], ["y"]),
    ]
    inits = [
        _f("ax", [-1], np.int64),
        _f("kshape", [2, 10, 1], np.int64),
        _f("nm1", float(H - 1)),
        _f("eps", 1e-5),
        *_gb(),
    ]
    m = _model(nodes, inits, 18, x_shape=(2, 10, H))
    r = lnfuse.optimize(m)
    assert _ops(r.model) == Counter({"LayerNormalization": 1})
    assert "unbiased" in r.report.matches[0].flags
    onnx.checker.check_model(r.model, full_check=True)
    _equal(m, r.model, (2, 10, H))


def test_keepdims0_mean_used_directly_is_refused() -> None:
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=0),
        h.make_node("Sub", ["x", "m"], ["d"]),  # broadcasts along the wrong axis
        h.make_node("Mul", ["d", "d"], ["dd"]),
        h.make_node("ReduceMean", ["dd"], ["v"], axes=[-1], keepdims=1),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["y"]),
    ]
    m = _model(nodes, [_f("eps", 1e-5)], 13, x_shape=(H, H, H))
    r = lnfuse.optimize(m)
    assert not r.changed
    assert any("keepdims=0" in x.reason for x in r.report.refusals)


def test_unbiased_variance_with_n_from_shape() -> None:
    # TorchScript's x.var(-1, keepdim=True): N = ReduceProd(Gather(Shape(x), -1)), static here.
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
        h.make_node("ReduceMean", ["x"], ["m1"], axes=[-1], keepdims=1),
        h.make_node("Shape", ["x"], ["shp"]),
        h.make_node("Gather", ["shp", "im1"], ["n_"], axis=0),
        h.make_node("ReduceProd", ["n_"], ["N"], keepdims=0),
        h.make_node("Sub", ["x", "m1"], ["d1"]),
        h.make_node("Mul", ["d1", "d1"], ["dd"]),
        h.make_node("ReduceMean", ["dd"], ["vb"], axes=[-1], keepdims=1),
        h.make_node("Cast", ["N"], ["Nf"], to=TP.FLOAT),
        h.make_node("Mul", ["vb", "Nf"], ["ss"]),
        h.make_node("Sub", ["Nf", "one"], ["Nm1"]),
        h.make_node("Div", ["ss", "Nm1"], ["var"]),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Add", ["var", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["n"]),
        h.make_node("Mul", ["n", "g"], ["ng"]),
        h.make_node("Add", ["ng", "b"], ["y"]),
    ]
    inits = [_f("im1", [-1], np.int64), _f("one", 1.0), _f("eps", 1e-5), *_gb()]
    m = _model(nodes, inits, 13)
    r = lnfuse.optimize(m)
    assert _ops(r.model) == Counter({"LayerNormalization": 1})
    _equal(m, r.model, (2, 3, H))


def _two_ln_cse(second_eps_outside: bool = False) -> onnx.ModelProto:
    # Two hand-written LNs of one x; the exporter merged mean, x - mean and the variance.
    tail2 = (
        [h.make_node("Sqrt", ["v"], ["sv"]), h.make_node("Add", ["sv", "eps2"], ["sd2"])]
        if second_eps_outside
        else [h.make_node("Add", ["v", "eps2"], ["ve2"]), h.make_node("Sqrt", ["ve2"], ["sd2"])]
    )
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
        h.make_node("Sub", ["x", "m"], ["d"]),
        h.make_node("Pow", ["d", "two"], ["d2"]),
        h.make_node("ReduceMean", ["d2"], ["v"], axes=[-1], keepdims=1),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["n"]),
        h.make_node("Mul", ["g", "n"], ["ng"]),
        h.make_node("Add", ["ng", "b"], ["y"]),
        *tail2,
        h.make_node("Div", ["d", "sd2"], ["n2"]),
        h.make_node("Mul", ["g2", "n2"], ["ng2"]),
        h.make_node("Add", ["ng2", "b2"], ["y2"]),
    ]
    inits = [
        _f("two", 2.0),
        _f("eps", 1e-5),
        _f("eps2", 1e-6),
        *_gb(),
        _f("g2", RNG.normal(1, 0.2, H)),
        _f("b2", RNG.normal(0, 0.2, H)),
    ]
    return _model(nodes, inits, 13, outputs=(("y", TP.FLOAT), ("y2", TP.FLOAT)))


def test_two_layernorms_sharing_statistics_are_both_fused() -> None:
    m = _two_ln_cse()
    r = lnfuse.optimize(m)
    assert _ops(r.model) == Counter({"LayerNormalization": 2})
    onnx.checker.check_model(r.model, full_check=True)
    _equal(m, r.model, (2, 3, H))


def test_shared_statistics_with_a_lookalike_partner_fuse_nothing() -> None:
    # The second "norm" has eps outside the sqrt: not a norm, so the first cannot close alone.
    m = _two_ln_cse(second_eps_outside=True)
    r = lnfuse.optimize(m)
    assert not r.changed


def test_rms_pass_leaves_centred_inputs_alone() -> None:
    # (x - mean(z)) / sqrt(mean((x - mean(z))**2) + eps): an RMSNorm of a centred value built
    # from another tensor's mean: a layer-norm look-alike, not something to emit RMSNormalization for.
    nodes = [
        h.make_node("Relu", ["x"], ["z"]),
        h.make_node("ReduceMean", ["z"], ["mz"], axes=[-1], keepdims=1),
        h.make_node("Sub", ["x", "mz"], ["d"]),
        h.make_node("Mul", ["d", "d"], ["dd"]),
        h.make_node("ReduceMean", ["dd"], ["v"], axes=[-1], keepdims=1),
        h.make_node("Add", ["v", "eps"], ["ve"]),
        h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["d", "sd"], ["y"]),
    ]
    m = _model(nodes, [_f("eps", 1e-5)], 17)
    for rms in (False, True):
        r = lnfuse.optimize(m, rmsnorm=rms)
        assert not r.changed
