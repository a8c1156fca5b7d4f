"""Export real PyTorch models with decomposed LayerNorm into ``models/exported/``.

This script needs PyTorch, which is *not* a dependency of lnfuse.  Run it from a
separate environment (see ``models/exported/README.md``)::

    /tmp/torchvenv/bin/python models/export_torch.py

Everything is exported with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``) at opsets below 17, where PyTorch
writes ``nn.LayerNorm`` as the decomposed chain
``ReduceMean Sub Pow ReduceMean Add Sqrt Div Mul Add``.  Constant folding stays on
(the default), as users export.  The outputs are deterministic (fixed seeds) and
small.  The files that do not need PyTorch (hand-built Loop/Scan/If models) come
from ``models/recurrent.py``.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT_DIR = Path(__file__).resolve().parent / "exported"

# Shapes of the recurrent fixtures.
RNN_INPUT = 16
RNN_HIDDEN = 32


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------


def _randomize_layernorms(module: nn.Module, scale: float = 0.1) -> None:
    """Give every LayerNorm a non-trivial gain/bias so numeric checks mean something."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
                sub.weight.copy_(1.0 + scale * torch.randn_like(sub.weight))
                sub.bias.copy_(scale * torch.randn_like(sub.bias))


def _export(
    model: nn.Module,
    args: tuple[Any, ...],
    name: str,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """Export with the TorchScript exporter, fix the IR version, check, and save."""
    path = OUT_DIR / f"{name}.onnx"
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    _finalize(path, opset)
    return path


def _finalize(path: Path, opset: int) -> None:
    """Clamp the IR version to what onnxruntime reads, run the full checker, re-save."""
    proto = onnx.load(str(path))
    max_ir = 8 if opset <= 17 else 10
    if proto.ir_version > max_ir:
        proto.ir_version = max_ir
    proto.producer_name = "lnfuse-fixtures/torch"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


# ----------------------------------------------------------------------------
# 1. Pre-LN transformer encoder block
# ----------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention written out with MatMul and Softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(att, v).transpose(1, 2).reshape(b, s, d)
        return self.proj(out)


class PreLNTransformerBlock(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)); final LN."""

    def __init__(self, dim: int = 64, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.ln_f(x)


def export_transformer_block() -> None:
    torch.manual_seed(0)
    model = PreLNTransformerBlock()
    _randomize_layernorms(model)
    _export(
        model,
        (torch.randn(2, 5, 64),),
        "transformer_block_opset14",
        14,
        ["x"],
        ["y"],
        {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
    )


# ----------------------------------------------------------------------------
# 2. Plain LayerNorm variants
# ----------------------------------------------------------------------------


class FunctionalLayerNorm(nn.Module):
    """``F.layer_norm`` with explicit parameters and a tiny eps."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


def export_plain_layernorms() -> None:
    seq_axes = {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}}
    for opset in (11, 13, 16):
        torch.manual_seed(opset)
        ln = nn.LayerNorm(64)
        _randomize_layernorms(ln)
        _export(ln, (torch.randn(2, 5, 64),), f"torch_layernorm_opset{opset}", opset, ["x"], ["y"], seq_axes)

    torch.manual_seed(21)
    ln2d = nn.LayerNorm((8, 16))
    _randomize_layernorms(ln2d)
    _export(ln2d, (torch.randn(2, 5, 8, 16),), "torch_layernorm_2d_opset14", 14, ["x"], ["y"], seq_axes)

    torch.manual_seed(22)
    ln_na = nn.LayerNorm(64, elementwise_affine=False)
    _export(ln_na, (torch.randn(2, 5, 64),), "torch_layernorm_noaffine_opset14", 14, ["x"], ["y"], seq_axes)

    torch.manual_seed(23)
    ln_h = nn.LayerNorm(64)
    _randomize_layernorms(ln_h)
    ln_h = ln_h.half()
    _export(ln_h, (torch.randn(2, 5, 64).half(),), "torch_layernorm_fp16_opset14", 14, ["x"], ["y"], seq_axes)

    torch.manual_seed(24)
    fln = FunctionalLayerNorm(64, eps=1e-12)
    with torch.no_grad():
        fln.weight.copy_(1.0 + 0.1 * torch.randn(64))
        fln.bias.copy_(0.1 * torch.randn(64))
    _export(fln, (torch.randn(2, 5, 64),), "torch_f_layer_norm_opset12", 12, ["x"], ["y"], seq_axes)


# ----------------------------------------------------------------------------
# 3. LN-RNN cells (Ba, Kiros, Hinton 2016)
# ----------------------------------------------------------------------------


class LNLSTMCell(nn.Module):
    """LN-LSTM: gates = LN(W_h h) + LN(W_x x) + b;  h = o * tanh(LN(c))."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.w_h = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.ln_x = nn.LayerNorm(4 * hidden_size)
        self.ln_h = nn.LayerNorm(4 * hidden_size)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        gates = self.ln_h(self.w_h(h)) + self.ln_x(self.w_x(x)) + self.bias
        f, i, o, g = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(self.ln_c(c_new))
        return h_new, c_new


class LNGRUCell(nn.Module):
    """LN-GRU: r, z, n pre-activations from LN(W_x x) and LN(W_h h)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.w_h = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.ln_x = nn.LayerNorm(3 * hidden_size)
        self.ln_h = nn.LayerNorm(3 * hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        gx = self.ln_x(self.w_x(x)) + self.bias
        gh = self.ln_h(self.w_h(h))
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h


class LNRNNCell(nn.Module):
    """LN vanilla RNN: h = tanh(LN(W_x x) + LN(W_h h) + b)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, hidden_size, bias=False)
        self.w_h = nn.Linear(hidden_size, hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.ln_x = nn.LayerNorm(hidden_size)
        self.ln_h = nn.LayerNorm(hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.ln_x(self.w_x(x)) + self.ln_h(self.w_h(h)) + self.bias)


class LNLSTM(nn.Module):
    """Runs an LNLSTMCell over x [T, batch, input]; h0/c0 are zeros made in the model."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = LNLSTMCell(input_size, hidden_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.zeros(x.size(1), self.hidden_size, dtype=x.dtype)
        c = torch.zeros(x.size(1), self.hidden_size, dtype=x.dtype)
        outs: list[Tensor] = []
        for t in range(x.size(0)):
            h, c = self.cell(x[t], h, c)
            outs.append(h)
        return torch.stack(outs), h, c


class LNLSTMWithState(nn.Module):
    """Runs an LNLSTMCell over x [T, batch, input] from given h0, c0."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = LNLSTMCell(input_size, hidden_size)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, c = h0, c0
        outs: list[Tensor] = []
        for t in range(x.size(0)):
            h, c = self.cell(x[t], h, c)
            outs.append(h)
        return torch.stack(outs), h, c


class LNSingleStateRNN(nn.Module):
    """Runs an LNGRUCell or LNRNNCell over x [T, batch, input] from zeros."""

    def __init__(self, cell: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = cell

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.zeros(x.size(1), self.hidden_size, dtype=x.dtype)
        outs: list[Tensor] = []
        for t in range(x.size(0)):
            h = self.cell(x[t], h)
            outs.append(h)
        return torch.stack(outs), h


def _randomize_rnn(model: nn.Module) -> None:
    _randomize_layernorms(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cell.bias"):
                param.copy_(0.1 * torch.randn_like(param))


def export_unrolled_rnns() -> None:
    batch_axes_lstm = {
        "x": {1: "batch"},
        "y": {1: "batch"},
        "h_n": {0: "batch"},
        "c_n": {0: "batch"},
    }
    for steps in (8, 32):
        torch.manual_seed(100 + steps)
        lstm = LNLSTM(RNN_INPUT, RNN_HIDDEN)
        _randomize_rnn(lstm)
        _export(
            lstm,
            (torch.randn(steps, 2, RNN_INPUT),),
            f"ln_lstm_unrolled_T{steps}",
            14,
            ["x"],
            ["y", "h_n", "c_n"],
            batch_axes_lstm,
        )

    torch.manual_seed(108)
    lstm_s = LNLSTMWithState(RNN_INPUT, RNN_HIDDEN)
    _randomize_rnn(lstm_s)
    _export(
        lstm_s,
        (torch.randn(8, 2, RNN_INPUT), torch.randn(2, RNN_HIDDEN), torch.randn(2, RNN_HIDDEN)),
        "ln_lstm_unrolled_T8_h0input",
        14,
        ["x", "h0", "c0"],
        ["y", "h_n", "c_n"],
        {**batch_axes_lstm, "h0": {0: "batch"}, "c0": {0: "batch"}},
    )

    single_axes = {"x": {1: "batch"}, "y": {1: "batch"}, "h_n": {0: "batch"}}
    torch.manual_seed(208)
    gru = LNSingleStateRNN(LNGRUCell(RNN_INPUT, RNN_HIDDEN), RNN_HIDDEN)
    _randomize_rnn(gru)
    _export(gru, (torch.randn(8, 2, RNN_INPUT),), "ln_gru_unrolled_T8", 14, ["x"], ["y", "h_n"], single_axes)

    torch.manual_seed(308)
    rnn = LNSingleStateRNN(LNRNNCell(RNN_INPUT, RNN_HIDDEN), RNN_HIDDEN)
    _randomize_rnn(rnn)
    _export(rnn, (torch.randn(8, 2, RNN_INPUT),), "ln_rnn_unrolled_T8", 14, ["x"], ["y", "h_n"], single_axes)


class ScriptedLNLSTM(nn.Module):
    """The LNLSTM sequence loop written for ``torch.jit.script`` (exports as an ONNX Loop)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = LNLSTMCell(input_size, hidden_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.zeros(x.size(1), self.hidden_size, dtype=x.dtype)
        c = torch.zeros(x.size(1), self.hidden_size, dtype=x.dtype)
        outs: list[Tensor] = []
        for t in range(x.size(0)):
            h, c = self.cell(x[t], h, c)
            outs.append(h)
        return torch.stack(outs), h, c


def export_scripted_loop() -> None:
    """Script the sequence wrapper so the time loop stays an ONNX Loop (T dynamic)."""
    torch.manual_seed(408)
    model = ScriptedLNLSTM(RNN_INPUT, RNN_HIDDEN)
    _randomize_rnn(model)
    model.eval()
    scripted = torch.jit.script(model)
    _export(
        scripted,
        (torch.randn(8, 2, RNN_INPUT),),
        "ln_lstm_scripted_loop",
        14,
        ["x"],
        ["y", "h_n", "c_n"],
        {
            "x": {0: "time", 1: "batch"},
            "y": {0: "time", 1: "batch"},
            "h_n": {0: "batch"},
            "c_n": {0: "batch"},
        },
    )


# ----------------------------------------------------------------------------
# Self-check against the registry
# ----------------------------------------------------------------------------


def _check_counts() -> int:
    """Compare the LN counts of every written file with ``models.recurrent.EXPORTED``."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from models.recurrent import EXPORTED, count_decomposed_ln

    failures = 0
    for case in EXPORTED:
        path = OUT_DIR / f"{case.name}.onnx"
        if not path.exists():
            print(f"  missing   {case.name}")
            failures += 1
            continue
        got = count_decomposed_ln(onnx.load(str(path)))
        status = "ok" if got == case.expect_ln else "MISMATCH"
        if got != case.expect_ln:
            failures += 1
        print(f"  {status:8s}  {case.name}: {got} decomposed LN (registry {case.expect_ln})")
    return failures


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}")
    export_transformer_block()
    export_plain_layernorms()
    export_unrolled_rnns()
    export_scripted_loop()
    return 1 if _check_counts() else 0


if __name__ == "__main__":
    raise SystemExit(main())
