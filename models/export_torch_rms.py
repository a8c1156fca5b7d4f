"""Export hand-written PyTorch RMSNorms into ``models/exported/torch/``.

Needs PyTorch (not a dependency of lnfuse); run it from its own environment::

    /tmp/torchvenv/bin/python models/export_torch_rms.py

Two forms that lnfuse once missed, as the TorchScript exporter (``dynamo=False``, opset 17,
constant folding on) writes them:

* ``torch_rmsnorm_noeps_opset17``: ``x * rsqrt(mean(x**2)) * weight``, no eps at all;
* ``torch_rmsnorm_fp16_sum_opset17``: in fp16 (``model.half()``), the mean written as
  ``sum(x**2) * (1 / 5)`` (the factor stored as fp16 0.19995) and eps 1e-8, which fp16 rounds to 0.

Fixed seeds; IR clamped to 8; every file passes ``onnx.checker`` with ``full_check``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

OUT_DIR = Path(__file__).resolve().parent / "exported" / "torch"


class NoEpsRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * self.weight


class SumRMSNorm(nn.Module):
    """The mean as a sum times 1/N, and an eps too small for fp16."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        ms = x.pow(2).sum(-1, keepdim=True) * (1.0 / self.dim)
        return self.weight * (x / torch.sqrt(ms + self.eps))


def _export(model: nn.Module, x: Tensor, name: str) -> None:
    path = OUT_DIR / f"{name}.onnx"
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            do_constant_folding=True,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 8)
    proto.producer_name = "lnfuse-fixtures/torch"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    print(f"  wrote {path.name}: {[n.op_type for n in proto.graph.node]}")


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}")
    torch.manual_seed(31)
    _export(NoEpsRMSNorm(64), torch.randn(2, 5, 64), "torch_rmsnorm_noeps_opset17")
    torch.manual_seed(32)
    _export(SumRMSNorm(5, eps=1e-8).half(), torch.randn(2, 3, 5).half(), "torch_rmsnorm_fp16_sum_opset17")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
