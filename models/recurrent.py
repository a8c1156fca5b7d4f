"""Recurrent and control-flow fixtures with decomposed LayerNorm, and the registry of ``models/exported/``.

Two kinds of files live in ``models/exported/``:

* PyTorch exports written by ``models/export_torch.py`` (needs PyTorch, run in a
  separate environment);
* hand-built ``Loop`` / ``Scan`` / ``If`` models written here with ``onnx.helper``
  only (``python -m models.recurrent``), each a decomposed LayerNorm in the
  exact PyTorch form ``ReduceMean Sub Pow(2) ReduceMean Add(eps) Sqrt Div Mul Add``
  inside a subgraph.

``EXPORTED`` lists every committed file with the number of decomposed LayerNorm
instances it holds, all subgraphs included.  This module imports without PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

OUT_DIR = Path(__file__).resolve().parent / "exported"

INPUT_SIZE = 16
HIDDEN = 32
FEATURES = 64


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedCase:
    """One committed file in ``models/exported/``."""

    name: str  # file stem in models/exported/
    expect_ln: int  # decomposed LNs in the graph, all subgraphs included
    steps: int | None = None  # T for unrolled RNNs
    ln_per_step: int | None = None
    notes: str = ""
    #: Computes through a narrower float type than its outputs (fp16 inside an fp32 graph): compared
    #: at that type's tolerance (lnfuse.precision), not the output's; see tests/test_precision.py.
    mixed_precision: bool = False


EXPORTED: tuple[ExportedCase, ...] = (
    ExportedCase(
        "transformer_block_opset14",
        3,
        notes="pre-LN encoder block (torch): ln1 -> MHA -> residual, ln2 -> MLP(GELU) -> residual, ln_f; "
        "x [batch, seq, 64]",
    ),
    ExportedCase("torch_layernorm_opset11", 1, notes="nn.LayerNorm(64), torch exporter, opset 11 (IR 6)"),
    ExportedCase("torch_layernorm_opset13", 1, notes="nn.LayerNorm(64), torch exporter, opset 13"),
    ExportedCase("torch_layernorm_opset16", 1, notes="nn.LayerNorm(64), torch exporter, opset 16"),
    ExportedCase(
        "torch_layernorm_2d_opset14",
        1,
        notes="nn.LayerNorm((8, 16)): ReduceMean axes=[-2, -1], gain/bias [8, 16]",
    ),
    ExportedCase(
        "torch_layernorm_noaffine_opset14",
        1,
        notes="elementwise_affine=False: chain ends at Div (no Mul/Add)",
    ),
    ExportedCase(
        "torch_layernorm_fp16_opset14",
        1,
        notes="model.half(): ReduceMean and Sub in fp16, then Cast(to=DOUBLE); Pow/ReduceMean/Add/Sqrt/Div "
        "in float64 (exponent and eps are float64 Constants), Cast(to=FLOAT16) before Mul/Add",
    ),
    ExportedCase(
        "torch_f_layer_norm_opset12", 1, notes="F.layer_norm(eps=1e-12) with nn.Parameter weight/bias"
    ),
    ExportedCase(
        "bert_tiny_mlm_autocast_fp16_opset14",
        6,
        notes="models/export_precision.py: tiny BertForMaskedLM exported under torch.autocast('cpu', "
        "float16); 5 fp32 LNs, the head's LN rounds through fp16 (fp16 mean/Sub, fp64 variance, "
        "Cast fp16 -> Cast fp32 before the affine); int64 input_ids, fp32 logits",
        mixed_precision=True,
    ),
    ExportedCase(
        "bert_tiny_fp16_keepio_opset14",
        5,
        notes="models/export_precision.py: tiny BertModel, torch.onnx.export, then onnxconverter-common "
        "convert_float_to_float16(keep_io_types=True): fp16 inside, fp32 last_hidden_state out",
        mixed_precision=True,
    ),
    ExportedCase(
        "ln_lstm_unrolled_T8",
        24,
        steps=8,
        ln_per_step=3,
        notes="traced LN-LSTM, h0/c0 zeros via ConstantOfShape(Shape(x)) (dynamic batch, so step 0 is not "
        "constant-folded); gain/bias initializers shared by all steps",
    ),
    ExportedCase("ln_lstm_unrolled_T32", 96, steps=32, ln_per_step=3, notes="as T8 with 32 steps"),
    ExportedCase(
        "ln_lstm_unrolled_T8_h0input",
        24,
        steps=8,
        ln_per_step=3,
        notes="traced LN-LSTM with h0/c0 graph inputs",
    ),
    ExportedCase(
        "ln_gru_unrolled_T8", 16, steps=8, ln_per_step=2, notes="traced LN-GRU (LN on W_x x and W_h h)"
    ),
    ExportedCase("ln_rnn_unrolled_T8", 16, steps=8, ln_per_step=2, notes="traced LN tanh-RNN"),
    ExportedCase(
        "ln_lstm_scripted_loop",
        3,
        ln_per_step=3,
        notes="torch.jit.script'ed LN-LSTM: ONNX Loop (dynamic T) with SequenceInsert/ConcatFromSequence; "
        "LN gain/bias are outer-scope initializers",
    ),
    ExportedCase(
        "ln_lstm_loop",
        3,
        ln_per_step=3,
        notes="onnx.helper Loop, one LN-LSTM step per iteration; gain/bias/eps/exponent are OUTER-scope "
        "initializers (eps and Pow exponent shared by the three LNs)",
    ),
    ExportedCase(
        "ln_lstm_loop_inner_params",
        3,
        ln_per_step=3,
        notes="as ln_lstm_loop, but gain/bias/eps/exponent are Constant nodes inside the body",
    ),
    ExportedCase(
        "ln_gru_scan",
        2,
        ln_per_step=2,
        notes="Scan over time (opset 16); LN gain/bias are initializers OF THE BODY graph; h0 graph input",
    ),
    ExportedCase(
        "if_ln_both_branches",
        2,
        notes="If(cond): then-LN eps=1e-5 with outer initializers, else-LN eps=1e-6 with Constant nodes",
    ),
    ExportedCase(
        "nested_loop_if_ln",
        1,
        notes="Loop body holds an If (even iterations) whose then-branch has the LN; gain/bias two scopes up",
    ),
)


# ----------------------------------------------------------------------------
# Independent counting (no matcher involved)
# ----------------------------------------------------------------------------


def iter_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """Yield ``graph`` and every subgraph (Loop/Scan bodies, If branches), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def count_ops(model: ModelProto, op_type: str) -> int:
    """Number of ``op_type`` nodes in the model, all subgraphs included."""
    return sum(1 for g in iter_graphs(model.graph) for n in g.node if n.op_type == op_type)


def _constant_values(model: ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers and ``Constant(value=...)`` outputs of every scope, by name."""
    values: dict[str, np.ndarray] = {}
    for g in iter_graphs(model.graph):
        for init in g.initializer:
            values[init.name] = numpy_helper.to_array(init)
        for n in g.node:
            if n.op_type == "Constant":
                for attr in n.attribute:
                    if attr.name == "value":
                        values[n.output[0]] = numpy_helper.to_array(attr.t)
    return values


def count_decomposed_ln(model: ModelProto) -> int:
    """Count decomposed LayerNorm instances without any pattern matcher.

    Every decomposed LN takes exactly one square root of ``variance + eps``, written
    either as a ``Sqrt`` node (PyTorch's form) or as ``Pow(v, 0.5)`` /
    ``Pow(v, -0.5)`` (other exporters).  So the count is the number of ``Sqrt``
    nodes plus the number of ``Pow`` nodes whose exponent is a constant ±0.5,
    across the main graph and all subgraphs.  ``Pow(d, 2)`` (the square inside the
    variance) is not counted.  This holds for the fixtures here because none of
    them has another square root (attention scaling is a folded constant).
    """
    consts = _constant_values(model)
    total = 0
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "Sqrt":
                total += 1
            elif n.op_type == "Pow" and len(n.input) > 1 and n.input[1] in consts:
                exp = consts[n.input[1]]
                if exp.size == 1 and abs(abs(float(exp.reshape(-1)[0])) - 0.5) < 1e-6:
                    total += 1
    return total


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.array(array, order="C"), name)


def _const_node(name: str, array: np.ndarray) -> NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=_tensor(name, array))


def _f32(array: np.ndarray | float) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class _LNParams:
    """Random gain/bias of one LN, by name."""

    def __init__(self, rng: np.random.Generator, prefix: str, size: int) -> None:
        self.gamma_name = f"{prefix}.weight"
        self.beta_name = f"{prefix}.bias"
        self.gamma = _f32(1.0 + 0.1 * rng.standard_normal(size))
        self.beta = _f32(0.1 * rng.standard_normal(size))

    def initializers(self) -> list[TensorProto]:
        return [_tensor(self.gamma_name, self.gamma), _tensor(self.beta_name, self.beta)]

    def constant_nodes(self) -> list[NodeProto]:
        return [_const_node(self.gamma_name, self.gamma), _const_node(self.beta_name, self.beta)]


def decomposed_ln(
    x: str,
    out: str,
    prefix: str,
    gamma: str,
    beta: str,
    eps: str,
    two: str,
    axes: tuple[int, ...] = (-1,),
) -> list[NodeProto]:
    """PyTorch's LN chain: ReduceMean Sub Pow ReduceMean Add Sqrt Div Mul Add (opset < 18 ReduceMean)."""

    def t(s: str) -> str:
        return f"{prefix}/{s}"

    return [
        helper.make_node("ReduceMean", [x], [t("mean")], name=t("ReduceMean"), axes=list(axes)),
        helper.make_node("Sub", [x, t("mean")], [t("centered")], name=t("Sub")),
        helper.make_node("Pow", [t("centered"), two], [t("squared")], name=t("Pow")),
        helper.make_node("ReduceMean", [t("squared")], [t("var")], name=t("ReduceMean_1"), axes=list(axes)),
        helper.make_node("Add", [t("var"), eps], [t("var_eps")], name=t("Add")),
        helper.make_node("Sqrt", [t("var_eps")], [t("std")], name=t("Sqrt")),
        helper.make_node("Div", [t("centered"), t("std")], [t("normed")], name=t("Div")),
        helper.make_node("Mul", [t("normed"), gamma], [t("scaled")], name=t("Mul")),
        helper.make_node("Add", [t("scaled"), beta], [out], name=t("Add_1")),
    ]


def _zeros_like_batch(x: str, out: str, prefix: str) -> list[NodeProto]:
    """Zeros [batch, hidden] with batch = x.shape[1]; needs initializers idx_one_1d and {prefix}/hidden."""
    return [
        helper.make_node("Shape", [x], [f"{prefix}/shape"], name=f"{prefix}/Shape"),
        helper.make_node(
            "Gather", [f"{prefix}/shape", "idx_one_1d"], [f"{prefix}/batch"], name=f"{prefix}/Gather", axis=0
        ),
        helper.make_node(
            "Concat",
            [f"{prefix}/batch", f"{prefix}/hidden"],
            [f"{prefix}/state_shape"],
            name=f"{prefix}/Concat",
            axis=0,
        ),
        helper.make_node(
            "ConstantOfShape",
            [f"{prefix}/state_shape"],
            [out],
            name=f"{prefix}/ConstantOfShape",
            value=_tensor("value", _f32([0.0])),
        ),
    ]


def _finish(graph: GraphProto, opset: int, path: Path | None = None) -> ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lnfuse-fixtures/recurrent",
    )
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


def _lstm_step_body(rng: np.random.Generator, inner_params: bool) -> tuple[GraphProto, list[TensorProto]]:
    """Loop body: one LN-LSTM step.  Returns the body and the outer initializers it references."""
    h4 = 4 * HIDDEN
    ln_x = _LNParams(rng, "cell.ln_x", h4)
    ln_h = _LNParams(rng, "cell.ln_h", h4)
    ln_c = _LNParams(rng, "cell.ln_c", HIDDEN)
    outer: list[TensorProto] = [
        _tensor("cell.w_x", _f32(rng.uniform(-0.2, 0.2, (INPUT_SIZE, h4)))),
        _tensor("cell.w_h", _f32(rng.uniform(-0.2, 0.2, (HIDDEN, h4)))),
        _tensor("cell.bias", _f32(0.1 * rng.standard_normal(h4))),
        _tensor("gate_split", np.array([HIDDEN] * 4, dtype=np.int64)),
    ]
    nodes: list[NodeProto] = []
    if inner_params:
        for p in (ln_x, ln_h, ln_c):
            nodes += p.constant_nodes()
        for name in ("ln_x", "ln_h", "ln_c"):
            nodes.append(_const_node(f"{name}/eps", _f32(1e-5)))
            nodes.append(_const_node(f"{name}/two", _f32(2.0)))
        eps = {k: f"{k}/eps" for k in ("ln_x", "ln_h", "ln_c")}
        two = {k: f"{k}/two" for k in ("ln_x", "ln_h", "ln_c")}
    else:
        for p in (ln_x, ln_h, ln_c):
            outer += p.initializers()
        outer += [_tensor("ln_eps", _f32(1e-5)), _tensor("pow_two", _f32(2.0))]
        eps = dict.fromkeys(("ln_x", "ln_h", "ln_c"), "ln_eps")
        two = dict.fromkeys(("ln_x", "ln_h", "ln_c"), "pow_two")

    nodes += [
        helper.make_node("Gather", ["x", "iter"], ["x_t"], name="Gather_x_t", axis=0),
        helper.make_node("MatMul", ["h_prev", "cell.w_h"], ["gh"], name="w_h/MatMul"),
    ]
    nodes += decomposed_ln("gh", "gh_ln", "ln_h", ln_h.gamma_name, ln_h.beta_name, eps["ln_h"], two["ln_h"])
    nodes.append(helper.make_node("MatMul", ["x_t", "cell.w_x"], ["gx"], name="w_x/MatMul"))
    nodes += decomposed_ln("gx", "gx_ln", "ln_x", ln_x.gamma_name, ln_x.beta_name, eps["ln_x"], two["ln_x"])
    nodes += [
        helper.make_node("Add", ["gh_ln", "gx_ln"], ["gsum"], name="Add_gates"),
        helper.make_node("Add", ["gsum", "cell.bias"], ["gates"], name="Add_bias"),
        helper.make_node("Split", ["gates", "gate_split"], ["f", "i", "o", "g"], name="Split_gates", axis=1),
        helper.make_node("Sigmoid", ["f"], ["f_s"], name="Sigmoid_f"),
        helper.make_node("Sigmoid", ["i"], ["i_s"], name="Sigmoid_i"),
        helper.make_node("Sigmoid", ["o"], ["o_s"], name="Sigmoid_o"),
        helper.make_node("Tanh", ["g"], ["g_t"], name="Tanh_g"),
        helper.make_node("Mul", ["f_s", "c_prev"], ["fc"], name="Mul_fc"),
        helper.make_node("Mul", ["i_s", "g_t"], ["ig"], name="Mul_ig"),
        helper.make_node("Add", ["fc", "ig"], ["c_new"], name="Add_c"),
    ]
    nodes += decomposed_ln("c_new", "c_ln", "ln_c", ln_c.gamma_name, ln_c.beta_name, eps["ln_c"], two["ln_c"])
    nodes += [
        helper.make_node("Tanh", ["c_ln"], ["c_t"], name="Tanh_c"),
        helper.make_node("Mul", ["o_s", "c_t"], ["h_new"], name="Mul_h"),
        helper.make_node("Identity", ["h_new"], ["h_scan"], name="Identity_scan"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="Identity_cond"),
    ]
    state = [None, HIDDEN]
    body = helper.make_graph(
        nodes,
        "ln_lstm_step",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_prev", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("c_prev", TensorProto.FLOAT, state),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_new", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("c_new", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("h_scan", TensorProto.FLOAT, state),
        ],
    )
    return body, outer


def _build_lstm_loop(inner_params: bool, seed: int) -> GraphProto:
    rng = np.random.default_rng(seed)
    body, outer = _lstm_step_body(rng, inner_params)
    outer += [
        _tensor("idx_zero", np.array(0, dtype=np.int64)),
        _tensor("idx_one_1d", np.array([1], dtype=np.int64)),
        _tensor("state/hidden", np.array([HIDDEN], dtype=np.int64)),
        _tensor("loop_cond", np.array(True)),
    ]
    nodes = [
        *_zeros_like_batch("x", "zeros_state", "state"),
        helper.make_node("Gather", ["state/shape", "idx_zero"], ["trip_count"], name="Gather_T", axis=0),
        helper.make_node(
            "Loop",
            ["trip_count", "loop_cond", "zeros_state", "zeros_state"],
            ["h_n", "c_n", "y"],
            name="Loop_time",
            body=body,
        ),
    ]
    return helper.make_graph(
        nodes,
        "ln_lstm_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", INPUT_SIZE])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", HIDDEN]),
            helper.make_tensor_value_info("h_n", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("c_n", TensorProto.FLOAT, ["batch", HIDDEN]),
        ],
        initializer=outer,
    )


def build_ln_lstm_loop(path: Path | None = None) -> ModelProto:
    """Loop over time, body = one LN-LSTM step; LN gain/bias are outer-scope initializers."""
    return _finish(_build_lstm_loop(inner_params=False, seed=14), 14, path)


def build_ln_lstm_loop_inner_params(path: Path | None = None) -> ModelProto:
    """As :func:`build_ln_lstm_loop`, with LN gain/bias/eps as Constant nodes inside the body."""
    return _finish(_build_lstm_loop(inner_params=True, seed=15), 14, path)


def build_ln_gru_scan(path: Path | None = None) -> ModelProto:
    """Scan over the time axis, body = one LN-GRU step; LN params are body initializers."""
    rng = np.random.default_rng(16)
    h3 = 3 * HIDDEN
    ln_x = _LNParams(rng, "cell.ln_x", h3)
    ln_h = _LNParams(rng, "cell.ln_h", h3)
    body_inits = [
        *ln_x.initializers(),
        *ln_h.initializers(),
        _tensor("ln_x/eps", _f32(1e-5)),
        _tensor("ln_h/eps", _f32(1e-5)),
        _tensor("two", _f32(2.0)),
        _tensor("one", _f32(1.0)),
    ]
    outer = [
        _tensor("cell.w_x", _f32(rng.uniform(-0.2, 0.2, (INPUT_SIZE, h3)))),
        _tensor("cell.w_h", _f32(rng.uniform(-0.2, 0.2, (HIDDEN, h3)))),
        _tensor("cell.bias", _f32(0.1 * rng.standard_normal(h3))),
        _tensor("gate_split", np.array([HIDDEN] * 3, dtype=np.int64)),
    ]
    nodes = [helper.make_node("MatMul", ["x_t", "cell.w_x"], ["gx"], name="w_x/MatMul")]
    nodes += decomposed_ln("gx", "gx_ln", "ln_x", ln_x.gamma_name, ln_x.beta_name, "ln_x/eps", "two")
    nodes += [
        helper.make_node("Add", ["gx_ln", "cell.bias"], ["gxb"], name="Add_bias"),
        helper.make_node("MatMul", ["h_prev", "cell.w_h"], ["gh"], name="w_h/MatMul"),
    ]
    nodes += decomposed_ln("gh", "gh_ln", "ln_h", ln_h.gamma_name, ln_h.beta_name, "ln_h/eps", "two")
    nodes += [
        helper.make_node("Split", ["gxb", "gate_split"], ["xr", "xz", "xn"], name="Split_x", axis=1),
        helper.make_node("Split", ["gh_ln", "gate_split"], ["hr", "hz", "hn"], name="Split_h", axis=1),
        helper.make_node("Add", ["xr", "hr"], ["r_pre"], name="Add_r"),
        helper.make_node("Sigmoid", ["r_pre"], ["r"], name="Sigmoid_r"),
        helper.make_node("Add", ["xz", "hz"], ["z_pre"], name="Add_z"),
        helper.make_node("Sigmoid", ["z_pre"], ["z"], name="Sigmoid_z"),
        helper.make_node("Mul", ["r", "hn"], ["rhn"], name="Mul_rhn"),
        helper.make_node("Add", ["xn", "rhn"], ["n_pre"], name="Add_n"),
        helper.make_node("Tanh", ["n_pre"], ["n"], name="Tanh_n"),
        helper.make_node("Sub", ["one", "z"], ["one_minus_z"], name="Sub_z"),
        helper.make_node("Mul", ["one_minus_z", "n"], ["zn"], name="Mul_zn"),
        helper.make_node("Mul", ["z", "h_prev"], ["zh"], name="Mul_zh"),
        helper.make_node("Add", ["zn", "zh"], ["h_new"], name="Add_h"),
        helper.make_node("Identity", ["h_new"], ["y_t"], name="Identity_scan"),
    ]
    state = [None, HIDDEN]
    body = helper.make_graph(
        nodes,
        "ln_gru_step",
        [
            helper.make_tensor_value_info("h_prev", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [None, INPUT_SIZE]),
        ],
        [
            helper.make_tensor_value_info("h_new", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, state),
        ],
        initializer=body_inits,
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "x"], ["h_n", "y"], name="Scan_time", body=body, num_scan_inputs=1)],
        "ln_gru_scan",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", INPUT_SIZE]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("h_n", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", HIDDEN]),
        ],
        initializer=outer,
    )
    return _finish(graph, 16, path)


def build_if_ln_both_branches(path: Path | None = None) -> ModelProto:
    """If(cond): each branch a decomposed LN of x, eps 1e-5 (then) vs 1e-6 (else)."""
    rng = np.random.default_rng(17)
    ln_a = _LNParams(rng, "then_ln", FEATURES)
    ln_b = _LNParams(rng, "else_ln", FEATURES)
    out_shape = ["batch", "seq", FEATURES]

    then_nodes = decomposed_ln("x", "then_y", "then_ln", ln_a.gamma_name, ln_a.beta_name, "eps_then", "two")
    then_branch = helper.make_graph(
        then_nodes,
        "then_ln_branch",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, out_shape)],
    )
    else_nodes = [
        *ln_b.constant_nodes(),
        _const_node("else_ln/eps", _f32(1e-6)),
        _const_node("else_ln/two", _f32(2.0)),
        *decomposed_ln(
            "x", "else_y", "else_ln", ln_b.gamma_name, ln_b.beta_name, "else_ln/eps", "else_ln/two"
        ),
    ]
    else_branch = helper.make_graph(
        else_nodes,
        "else_ln_branch",
        [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, out_shape)],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="If_ln", then_branch=then_branch, else_branch=else_branch
            )
        ],
        "if_ln_both_branches",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, out_shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[
            *ln_a.initializers(),
            _tensor("eps_then", _f32(1e-5)),
            _tensor("two", _f32(2.0)),
        ],
    )
    return _finish(graph, 16, path)


def build_nested_loop_if_ln(path: Path | None = None) -> ModelProto:
    """Loop over time; body adds x_t to the state and, on even steps, an If applies a decomposed LN."""
    rng = np.random.default_rng(18)
    ln = _LNParams(rng, "nested_ln", FEATURES)
    state = [None, FEATURES]

    then_branch = helper.make_graph(
        [
            _const_node("nested_ln/eps", _f32(1e-5)),
            *decomposed_ln("u", "then_s", "nested_ln", ln.gamma_name, ln.beta_name, "nested_ln/eps", "two"),
        ],
        "even_step_ln",
        [],
        [helper.make_tensor_value_info("then_s", TensorProto.FLOAT, state)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Tanh", ["u"], ["else_s"], name="Tanh_odd")],
        "odd_step_tanh",
        [],
        [helper.make_tensor_value_info("else_s", TensorProto.FLOAT, state)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "iter"], ["x_t"], name="Gather_x_t", axis=0),
            helper.make_node("Add", ["s_prev", "x_t"], ["u"], name="Add_u"),
            helper.make_node("Mod", ["iter", "two_i64"], ["parity"], name="Mod_parity"),
            helper.make_node("Equal", ["parity", "zero_i64"], ["is_even"], name="Equal_even"),
            helper.make_node(
                "If", ["is_even"], ["s_new"], name="If_even", then_branch=then_branch, else_branch=else_branch
            ),
            helper.make_node("Identity", ["s_new"], ["s_scan"], name="Identity_scan"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="Identity_cond"),
        ],
        "nested_step",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_prev", TensorProto.FLOAT, state),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_new", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("s_scan", TensorProto.FLOAT, state),
        ],
    )
    nodes = [
        *_zeros_like_batch("x", "zeros_state", "state"),
        helper.make_node("Gather", ["state/shape", "idx_zero"], ["trip_count"], name="Gather_T", axis=0),
        helper.make_node(
            "Loop", ["trip_count", "loop_cond", "zeros_state"], ["s_n", "y"], name="Loop_time", body=body
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "nested_loop_if_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", FEATURES])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", FEATURES]),
            helper.make_tensor_value_info("s_n", TensorProto.FLOAT, ["batch", FEATURES]),
        ],
        initializer=[
            *ln.initializers(),
            _tensor("two", _f32(2.0)),
            _tensor("two_i64", np.array(2, dtype=np.int64)),
            _tensor("zero_i64", np.array(0, dtype=np.int64)),
            _tensor("idx_zero", np.array(0, dtype=np.int64)),
            _tensor("idx_one_1d", np.array([1], dtype=np.int64)),
            _tensor("state/hidden", np.array([FEATURES], dtype=np.int64)),
            _tensor("loop_cond", np.array(True)),
        ],
    )
    return _finish(graph, 16, path)


BUILDERS = {
    "ln_lstm_loop": build_ln_lstm_loop,
    "ln_lstm_loop_inner_params": build_ln_lstm_loop_inner_params,
    "ln_gru_scan": build_ln_gru_scan,
    "if_ln_both_branches": build_if_ln_both_branches,
    "nested_loop_if_ln": build_nested_loop_if_ln,
}


def main() -> None:
    """Write the hand-built control-flow fixtures into ``models/exported/``."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    expected = {c.name: c.expect_ln for c in EXPORTED}
    for name, build in BUILDERS.items():
        path = OUT_DIR / f"{name}.onnx"
        model = build(path)
        got = count_decomposed_ln(model)
        if got != expected[name]:
            raise SystemExit(f"{name}: {got} decomposed LNs, registry says {expected[name]}")
        print(f"wrote {path} ({got} decomposed LN)")


if __name__ == "__main__":
    main()


DYNAMIC_DIM = 3
_NP_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.BOOL: np.bool_,
}


def fixture_feeds(
    model: ModelProto, seed: int, dims: dict[str, int] | None = None
) -> list[dict[str, np.ndarray]]:
    """Seeded inputs for a fixture: symbolic dims from ``dims`` (else 3); one feed per value of each bool input."""
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    feed: dict[str, np.ndarray] = {}
    bool_inputs: list[str] = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dtype = _NP_TYPES[tensor_type.elem_type]
        shape = [
            d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, DYNAMIC_DIM)
            for d in tensor_type.shape.dim
        ]
        if dtype is np.bool_:
            bool_inputs.append(inp.name)
            feed[inp.name] = np.array(True)
        elif np.issubdtype(dtype, np.integer):
            feed[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    feeds = [feed]
    for name in bool_inputs:
        feeds = [{**f, name: np.array(v)} for f in feeds for v in (True, False)]
    return feeds
