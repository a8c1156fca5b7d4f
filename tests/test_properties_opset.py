"""Property-based tests for the opset raise: random ops around a decomposed LayerNorm in an old model.

A LayerNorm ``y = LN(x)`` on ``x: [2, 3, 8]`` is fused into ``LayerNormalization``, which needs
opset 17; the model is drawn at opset 11-16 and optionally raised further (``target_opset`` 18,
21 or 23). Next to the norm the model holds 1-4 ops, each reading ``y`` and writing a graph
output, drawn from those whose schema changed between 11 and 23 and whose every form the raise
must keep: Softmax / LogSoftmax / Hardmax over any axis, Split (equal or sized, attribute or
input), Unsqueeze / Squeeze, the Reduce family (axes as attribute or input, all axes, keepdims),
Pad (constant, reflect, edge), Clip, ArgMax / ArgMin (select_last_index), TopK, Slice, CumSum,
Gather / GatherElements, Reshape, Flatten, DepthToSpace (DCR, CRD), MaxPool / AveragePool
(ceil_mode, count_include_pad), Resize (nearest / linear, four coordinate modes), Cast, Where,
Shape, and the unary ops with attributes (LeakyRelu, Elu, HardSigmoid, Selu).

Properties of ``lnfuse.optimize``: the output passes ``check_model(full_check=True)``; it is at
the opset it says; every output equals the original's on ONNX Runtime (``ORT_DISABLE_ALL``;
integers exactly, floats within 1e-4 of ``max(1, |reference|)``); the LayerNorm is fused unless the
report says why the opset could not be raised; no run ends in an internal error (a rewrite that
failed the output check). ``LNFUSE_HYPOTHESIS_PROFILE=long`` runs 500 examples instead of 25.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from graph_builder import GraphBuilder, run_ort
from hypothesis import HealthCheck, currently_in_test_context, example, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import lnfuse
from lnfuse import opset as opset_mod
from lnfuse.errors import InputError

_SETTINGS = settings(
    max_examples=500 if os.environ.get("LNFUSE_HYPOTHESIS_PROFILE") == "long" else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SHAPE = [2, 3, 8]
I64, F32 = TensorProto.INT64, TensorProto.FLOAT


@dataclass(frozen=True)
class OpSpec:
    kind: str
    params: tuple[tuple[str, Any], ...]

    def get(self, key: str) -> Any:
        return dict(self.params)[key]


_CHOICES: dict[str, dict[str, list[Any]]] = {
    "softmax": {"op": ["Softmax", "LogSoftmax", "Hardmax"], "axis": [-1, 0, 1, 2]},
    "split": {"axis": [1, 2], "sizes": [False, True]},
    "unsqueeze": {"axis": [0, -1, 2]},
    "reduce": {
        "op": [
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceL2",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        ],
        "axes": [[-1], [1], [0, 2], None],
        "keepdims": [0, 1],
    },
    "pad": {"mode": ["constant", "reflect", "edge"]},
    "clip": {"both": [False, True]},
    "arg": {"op": ["ArgMax", "ArgMin"], "axis": [-1, 1], "keepdims": [0, 1], "last": [0, 1]},
    "topk": {"largest": [0, 1]},
    "slice": {"step": [1, 2, -1]},
    "cumsum": {"exclusive": [0, 1], "reverse": [0, 1]},
    "gather": {"op": ["Gather", "GatherElements"]},
    "reshape": {"target": [[0, -1], [-1, 8], [2, 0, 2, 4]]},
    "flatten": {"axis": [0, 1, 2, -1]},
    "depth_to_space": {"mode": ["DCR", "CRD"]},
    "pool": {"op": ["MaxPool", "AveragePool"], "ceil": [0, 1], "pad": [0, 1], "include_pad": [0, 1]},
    "resize": {
        "mode": ["nearest", "linear"],
        "coord": ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"],
    },
    "cast": {"to": [TensorProto.DOUBLE, TensorProto.INT32, TensorProto.FLOAT16]},
    "where": {},
    "shape": {"op": ["Shape", "Size"]},
    "unary": {"op": ["LeakyRelu", "Elu", "HardSigmoid", "Selu"]},
    "scatter": {"op": ["ScatterElements", "ScatterND"]},
    "quantize": {"per_axis": [False, True]},
    "conv": {"op": ["Conv", "ConvTranspose"]},
    "lstm": {"op": ["LSTM", "GRU", "RNN"]},
    "resize_sizes": {"mode": ["cubic", "nearest"], "exclude": [0, 1]},
    "lppool": {"p": [1, 2]},
    "dropout": {},
    "if_body": {"then": [True, False]},
    "loop_body": {},
}


@st.composite
def op_specs(draw: st.DrawFn) -> OpSpec:
    kind = draw(st.sampled_from(sorted(_CHOICES)))
    params = tuple((k, draw(st.sampled_from(v))) for k, v in sorted(_CHOICES[kind].items()))
    return OpSpec(kind, params)


@dataclass(frozen=True)
class Spec:
    opset: int
    target: int | None
    ops: tuple[OpSpec, ...]
    seed: int


specs = st.builds(
    Spec,
    opset=st.integers(11, 16),
    target=st.sampled_from([None, None, 18, 21, 23]),
    ops=st.lists(op_specs(), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)


class _Builder(GraphBuilder):
    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset
        self.outputs: list[onnx.ValueInfoProto] = []

    def ints(
        self, op_type: str, x: str, name: str, values: list[int] | None, since: int, **attrs: Any
    ) -> list[str]:
        """``op_type`` with an ints list that is an attribute before opset ``since``, an input from it."""
        if values is None:
            return self.op(op_type, [x], **attrs)
        if self.opset < since:
            return self.op(op_type, [x], **{name: values}, **attrs)
        return self.op(op_type, [x, self.const(values, np.int64)], **attrs)

    def output(self, name: str, dtype: int = F32) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, None))


def _layernorm(b: _Builder) -> str:
    rng = np.random.default_rng(0)
    m = b.ints("ReduceMean", "x", "axes", [-1], 18)[0]
    d = b.op("Sub", ["x", m])[0]
    v = b.ints("ReduceMean", b.op("Pow", [d, b.const(2.0)])[0], "axes", [-1], 18)[0]
    s = b.op("Sqrt", [b.op("Add", [v, b.const(1e-5)])[0]])[0]
    n = b.op("Div", [d, s])[0]
    g = b.op("Mul", [n, b.const(1 + 0.2 * rng.standard_normal(8))])[0]
    return b.op("Add", [g, b.const(0.1 * rng.standard_normal(8))])[0]


def _four_d(b: _Builder, y: str, shape: list[int]) -> str:
    return b.op("Reshape", [y, b.const(shape, np.int64)])[0]


def _emit(b: _Builder, spec: OpSpec, y: str) -> None:
    """The op of ``spec`` reading ``y``, its outputs made graph outputs."""
    if spec.kind in _FIRST:
        outs = _emit_first(b, spec, y)
    elif spec.kind in _THIRD:
        outs = _emit_third(b, spec, y)
    else:
        outs = _emit_second(b, spec, y)
    for name, dtype in outs:
        b.output(name, dtype)


_FIRST = ("softmax", "split", "unsqueeze", "reduce", "pad", "clip", "arg", "topk", "slice", "cumsum")


def _emit_first(b: _Builder, spec: OpSpec, y: str) -> list[tuple[str, int]]:
    k, get = spec.kind, spec.get
    outs: list[tuple[str, int]] = []
    if k == "softmax":
        outs = [(b.op(get("op"), [y], axis=get("axis"))[0], F32)]
    elif k == "split":
        axis, sized = get("axis"), get("sizes")
        sizes = ([1, 2] if axis == 1 else [2, 6]) if sized else None
        n = 2 if sized else (3 if axis == 1 else 2)
        if sizes is None:
            parts = b.op("Split", [y], n, axis=axis)
        elif b.opset < 13:
            parts = b.op("Split", [y], n, axis=axis, split=sizes)
        else:
            parts = b.op("Split", [y, b.const(sizes, np.int64)], n, axis=axis)
        outs = [(p, F32) for p in parts]
    elif k == "unsqueeze":
        u = b.ints("Unsqueeze", y, "axes", [get("axis")], 13)[0]
        outs = [(b.ints("Squeeze", u, "axes", [get("axis")], 13)[0], F32)]
    elif k == "reduce":
        since = 13 if get("op") == "ReduceSum" else 18
        outs = [(b.ints(get("op"), y, "axes", get("axes"), since, keepdims=get("keepdims"))[0], F32)]
    elif k == "pad":
        pads = b.const([0, 0, 1, 0, 1, 2], np.int64)
        ins = [y, pads, b.const(0.5)] if get("mode") == "constant" else [y, pads]
        outs = [(b.op("Pad", ins, mode=get("mode"))[0], F32)]
    elif k == "clip":
        ins = [y, b.const(-0.5)] + ([b.const(0.7)] if get("both") else [])
        outs = [(b.op("Clip", ins)[0], F32)]
    elif k == "arg":
        extra = {"select_last_index": get("last")} if b.opset >= 12 else {}
        rounded = b.op("Round", [b.op("Mul", [y, b.const(2.0)])[0]])[0]  # ties, for select_last_index
        outs = [(b.op(get("op"), [rounded], axis=get("axis"), keepdims=get("keepdims"), **extra)[0], I64)]
    elif k == "topk":
        vals, idx = b.op("TopK", [y, b.const([3], np.int64)], 2, axis=-1, largest=get("largest"), sorted=1)
        outs = [(vals, F32), (idx, I64)]
    elif k == "slice":
        step = get("step")
        starts, ends = ([6], [0]) if step < 0 else ([1], [7])
        ins = [y, *(b.const(v, np.int64) for v in (starts, ends, [-1], [step]))]
        outs = [(b.op("Slice", ins)[0], F32)]
    elif k == "cumsum":
        ins = [y, b.const(1, np.int64)]
        outs = [(b.op("CumSum", ins, exclusive=get("exclusive"), reverse=get("reverse"))[0], F32)]
    return outs


def _emit_second(b: _Builder, spec: OpSpec, y: str) -> list[tuple[str, int]]:
    k, get = spec.kind, spec.get
    outs: list[tuple[str, int]] = []
    if k == "gather":
        if get("op") == "Gather":
            outs = [(b.op("Gather", [y, b.const([2, 0], np.int64)], axis=1)[0], F32)]
        else:
            idx = b.const(np.random.default_rng(1).integers(0, 3, (2, 2, 8)), np.int64)
            outs = [(b.op("GatherElements", [y, idx], axis=1)[0], F32)]
    elif k == "reshape":
        outs = [(b.op("Reshape", [y, b.const(get("target"), np.int64)])[0], F32)]
    elif k == "flatten":
        outs = [(b.op("Flatten", [y], axis=get("axis"))[0], F32)]
    elif k == "depth_to_space":
        outs = [(b.op("DepthToSpace", [_four_d(b, y, [1, 8, 2, 3])], blocksize=2, mode=get("mode"))[0], F32)]
    elif k == "pool":
        attrs: dict[str, Any] = {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": get("ceil")}
        attrs["pads"] = [get("pad"), 0, get("pad"), 1]
        if get("op") == "AveragePool":
            attrs["count_include_pad"] = get("include_pad")
        outs = [(b.op(get("op"), [_four_d(b, y, [2, 1, 3, 8])], **attrs)[0], F32)]
    elif k == "resize":
        attrs = {"mode": get("mode"), "coordinate_transformation_mode": get("coord")}
        ins = [_four_d(b, y, [2, 1, 3, 8]), b.const(np.zeros(0)), b.const([1.0, 1.0, 2.0, 1.5])]
        outs = [(b.op("Resize", ins, **attrs)[0], F32)]
    elif k == "cast":
        outs = [(b.op("Cast", [b.op("Mul", [y, b.const(3.0)])[0]], to=get("to"))[0], get("to"))]
    elif k == "where":
        cond = b.op("Greater", [y, b.const(0.0)])[0]
        outs = [(b.op("Where", [cond, y, b.op("Neg", [y])[0]])[0], F32)]
    elif k == "shape":
        outs = [(b.op(get("op"), [y])[0], I64)]
    else:
        attrs = {
            "LeakyRelu": {"alpha": 0.2},
            "Elu": {"alpha": 0.7},
            "HardSigmoid": {"alpha": 0.3, "beta": 0.4},
        }
        outs = [(b.op(get("op"), [y], **attrs.get(get("op"), {}))[0], F32)]
    return outs


_THIRD = ("scatter", "quantize", "conv", "lstm", "resize_sizes", "lppool", "dropout", "if_body", "loop_body")


def _emit_third(b: _Builder, spec: OpSpec, y: str) -> list[tuple[str, int]]:
    k, get = spec.kind, spec.get
    rng = np.random.default_rng(2)
    if k == "scatter":
        if get("op") == "ScatterElements":
            ins = [
                y,
                b.const(rng.integers(0, 3, (2, 1, 8)), np.int64),
                b.const(rng.standard_normal((2, 1, 8))),
            ]
            return [(b.op("ScatterElements", ins, axis=1)[0], F32)]
        ins = [y, b.const([[0, 1]], np.int64), b.const(rng.standard_normal((1, 8)))]
        return [(b.op("ScatterND", ins)[0], F32)]
    if k == "quantize":
        per_axis = get("per_axis") and b.opset >= 13
        scale = b.const(0.02 + 0.01 * rng.random(8) if per_axis else 0.02)
        zero = b.const(np.full(8, 128) if per_axis else 128, np.uint8)
        attrs = {"axis": 2} if per_axis else {}
        q = b.op("QuantizeLinear", [y, scale, zero], **attrs)[0]
        return [(q, TensorProto.UINT8), (b.op("DequantizeLinear", [q, scale, zero], **attrs)[0], F32)]
    if k == "conv":
        x4 = _four_d(b, y, [2, 3, 8, 1])
        shape = (4, 3, 3, 1) if get("op") == "Conv" else (3, 4, 3, 1)
        w = b.const(0.3 * rng.standard_normal(shape))
        return [(b.op(get("op"), [x4, w], pads=[1, 0, 1, 0])[0], F32)]
    if k == "lstm":
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[get("op")]
        w, r = (
            b.const(0.3 * rng.standard_normal((1, gates * 4, 8))),
            b.const(0.3 * rng.standard_normal((1, gates * 4, 4))),
        )
        y_all, y_h = b.op(get("op"), [y, w, r], 2, hidden_size=4)
        return [(y_all, F32), (y_h, F32)]
    if k == "resize_sizes":
        attrs = (
            {"mode": get("mode"), "exclude_outside": get("exclude")}
            if get("mode") == "cubic"
            else {"mode": "nearest"}
        )
        ins = [
            _four_d(b, y, [2, 1, 3, 8]),
            b.const(np.zeros(0)),
            b.const(np.zeros(0)),
            b.const([2, 1, 5, 12], np.int64),
        ]
        return [(b.op("Resize", ins, **attrs)[0], F32)]
    if k == "lppool":
        return [(b.op("LpPool", [_four_d(b, y, [2, 1, 3, 8])], kernel_shape=[2, 2], p=get("p"))[0], F32)]
    if k == "dropout":
        return [(b.op("Dropout", [y], ratio=0.3)[0] if b.opset < 12 else b.op("Dropout", [y])[0], F32)]
    return _emit_body(b, spec, y)


def _subgraph(b: _Builder, name: str, make: Any, inputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
    """A body built with ``b`` (its ops go into the body, its constants into the main graph)."""
    saved, b.nodes = b.nodes, []
    outputs = make()
    nodes, b.nodes = b.nodes, saved
    return helper.make_graph(nodes, name, inputs, outputs)


def _emit_body(b: _Builder, spec: OpSpec, y: str) -> list[tuple[str, int]]:
    """An If whose branches, or a Loop whose body, holds ops that change between opsets (attribute
    axes, an equal Split, a Softmax over axis 1), reading ``y`` from the outer scope (a Loop: its
    carried value)."""
    if spec.kind == "if_body":

        def then() -> list[onnx.ValueInfoProto]:
            sm = b.op("Softmax", [y], axis=1)[0]
            return [
                helper.make_tensor_value_info(
                    b.op("Concat", b.op("Split", [sm], 2, axis=2), axis=2)[0], F32, SHAPE
                )
            ]

        def other() -> list[onnx.ValueInfoProto]:
            u = b.ints("Unsqueeze", y, "axes", [0], 13)[0]
            return [helper.make_tensor_value_info(b.ints("Squeeze", u, "axes", [0], 13)[0], F32, SHAPE)]

        total = b.ints("ReduceSum", y, "axes", None, 13, keepdims=0)[0]
        cond = b.op("Greater", [total, b.const(-1e9 if spec.get("then") else 1e9)])[0]
        branches = {
            "then_branch": _subgraph(b, "then", then, []),
            "else_branch": _subgraph(b, "else", other, []),
        }
        return [(b.op("If", [cond], **branches)[0], F32)]

    def body() -> list[onnx.ValueInfoProto]:
        r = b.ints("ReduceSum", "v", "axes", [-1], 13, keepdims=1)[0]
        sq = b.ints("Squeeze", b.ints("Unsqueeze", "v", "axes", [0], 13)[0], "axes", [0], 13)[0]
        sm = b.op("Concat", b.op("Split", [b.op("Softmax", [sq], axis=1)[0]], 2, axis=2), axis=2)[0]
        nxt = b.op("Add", [b.op("Mul", [sm, b.const(0.5)])[0], r])[0]
        return [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info(nxt, F32, SHAPE),
        ]

    inputs = [
        helper.make_tensor_value_info("i", I64, []),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        helper.make_tensor_value_info("v", F32, SHAPE),
    ]
    loop = b.op(
        "Loop", [b.const(2, np.int64), b.const(True, np.bool_), y], 1, body=_subgraph(b, "body", body, inputs)
    )
    return [(loop[0], F32)]


def build(spec: Spec) -> onnx.ModelProto:
    b = _Builder(spec.opset)
    y = _layernorm(b)
    for op in spec.ops:
        _emit(b, op, y)
    graph = helper.make_graph(
        b.nodes, "ops", [helper.make_tensor_value_info("x", F32, SHAPE)], b.outputs, b.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=7)
    done = onnx.shape_inference.infer_shapes(model).graph
    inferred = {vi.name: vi for vi in (*done.value_info, *done.output)}
    for out in model.graph.output:  # the outputs' shapes as ONNX infers them (the checker wants one)
        found = inferred[out.name].type
        if found.tensor_type.HasField("shape"):
            out.type.CopyFrom(found)
        else:  # a Loop's final value: inference leaves its shape open; it is y's
            out.type.CopyFrom(helper.make_tensor_type_proto(found.tensor_type.elem_type, SHAPE))
    return model


def check_properties(spec: Spec) -> None:
    model = build(spec)
    if currently_in_test_context():
        note(repr(spec))
    onnx.checker.check_model(model, full_check=True)
    if spec.target is not None and opset_mod.plan(model, spec.target) is not None:
        with pytest.raises(InputError, match="cannot raise opset"):  # asked for exactly, or not at all
            lnfuse.optimize(model, target_opset=spec.target)
        return
    result = lnfuse.optimize(model, target_opset=spec.target)
    out, text = result.model, result.report.render_text(explain=True)
    onnx.checker.check_model(out, full_check=True)
    assert not any("internal error" in w for w in result.report.warnings), text
    want = max(17, spec.target or 0)
    if result.changed:
        assert opset_mod.default_opset(out) == want, text
        assert [n.op_type for n in out.graph.node].count("LayerNormalization") == 1, text
    else:
        assert opset_mod.plan(model, want) is not None, f"nothing fused, though the raise is exact\n{text}"
    x = (np.random.default_rng(spec.seed).standard_normal(SHAPE) + 0.5).astype(np.float32)
    for k, (a, c) in enumerate(zip(run_ort(model, {"x": x}), run_ort(out, {"x": x}), strict=True)):
        assert a.shape == c.shape and a.dtype == c.dtype, (
            f"output {k}: {c.shape} {c.dtype} != {a.shape} {a.dtype}"
        )
        if a.dtype.kind in "iub":
            assert np.array_equal(a, c), f"output {k} differs\n{text}"
        else:
            tol = (1e-2 if a.dtype == np.float16 else 1e-4) * max(1.0, float(np.max(np.abs(a))))
            assert float(np.max(np.abs(a.astype(np.float64) - c))) <= tol, f"output {k} differs\n{text}"


@_SETTINGS
@given(specs)
@example(  # a Softmax rewritten in the main graph left the one in the If branch as it was
    Spec(
        11,
        None,
        (OpSpec("if_body", (("then", True),)), OpSpec("softmax", (("axis", 0), ("op", "Softmax")))),
        0,
    )
)
def test_raised_models_compute_the_same(spec: Spec) -> None:
    check_properties(spec)


def test_every_op_kind_at_every_old_opset() -> None:
    """Each op kind with its first choices, alone, from every old opset to 17 and to 23."""
    for kind, choices in sorted(_CHOICES.items()):
        op = OpSpec(kind, tuple((k, v[0]) for k, v in sorted(choices.items())))
        for old in range(11, 17):
            for target in (None, 23):
                check_properties(Spec(old, target, (op,), seed=old))
