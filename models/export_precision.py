"""Export the mixed-precision fixtures of ``models/exported/`` with the real tools.

Needs PyTorch, transformers and onnxconverter-common, none of which lnfuse depends on.
Run it by hand from its own environment (see ``models/exported/README.md``)::

    python3 -m venv /tmp/fxvenv
    /tmp/fxvenv/bin/pip install torch transformers onnxconverter-common onnx onnxruntime onnxscript
    /tmp/fxvenv/bin/python models/export_precision.py

Written with torch 2.14.1, transformers 5.25.0, onnxconverter-common 1.16.0, onnx 1.23.2.

* ``bert_tiny_mlm_autocast_fp16_opset14``: a randomly initialised 2-layer
  ``BertForMaskedLM`` (hidden 32, vocab 100) exported under
  ``torch.autocast("cpu", dtype=torch.float16)`` (real CPU autocast, not an emulation):
  int64 ``input_ids`` in, fp32 ``logits`` out, MatMuls in fp16. The five encoder LNs read
  fp32 (residual sums promote), the prediction head's LN reads the fp16 dense/GELU output:
  ``ReduceMean``/``Sub`` in fp16, ``Cast`` to fp64 for the variance, ``Div`` cast to fp16
  and back to fp32 before the fp32 affine (an fp16 round trip inside the norm).
* ``bert_tiny_fp16_keepio_opset14``: a randomly initialised 2-layer ``BertModel`` (hidden 32)
  exported with ``torch.onnx.export`` (TorchScript exporter) and converted with
  ``onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)``:
  int64 ``input_ids`` in, fp32 ``last_hidden_state`` out, fp16 everything inside.

Deterministic (fixed seeds). No model hub is used: the BERT is built from its config.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_torch import _randomize_layernorms

OUT_DIR = Path(__file__).resolve().parent / "exported"
OPSET = 14
MAX_IR = 8  # onnxruntime-friendly IR for opset <= 17 (what test_exported_fixtures pins)


def _save(proto: onnx.ModelProto, name: str) -> Path:
    proto.ir_version = min(proto.ir_version, MAX_IR)
    proto.producer_name = "lnfuse-fixtures/precision"
    onnx.checker.check_model(proto, full_check=True)
    path = OUT_DIR / f"{name}.onnx"
    onnx.save(proto, str(path))
    return path


def _torch_export(model: torch.nn.Module, args: tuple, path: Path, names: tuple, axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=list(names[0]),
            output_names=list(names[1]),
            dynamic_axes=axes,
        )


def _tiny_bert_config():  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )


class _Logits(torch.nn.Module):
    """``input_ids`` -> one tensor (``logits`` or ``last_hidden_state``)."""

    def __init__(self, inner: torch.nn.Module, field: str) -> None:
        super().__init__()
        self.inner = inner
        self.field = field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.inner(input_ids=input_ids), self.field)


def _export_ids_model(model: torch.nn.Module, field: str, tmp: Path) -> onnx.ModelProto:
    ids = torch.randint(0, 100, (2, 7))
    axes = {"input_ids": {0: "batch", 1: "seq"}, field: {0: "batch", 1: "seq"}}
    _torch_export(_Logits(model, field).eval(), (ids,), tmp, (["input_ids"], [field]), axes)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    return proto


def export_autocast_mlm() -> Path:
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(_tiny_bert_config()).eval()
    _randomize_layernorms(model)
    with torch.autocast("cpu", dtype=torch.float16):
        proto = _export_ids_model(model, "logits", OUT_DIR / "_autocast_tmp.onnx")
    return _save(proto, "bert_tiny_mlm_autocast_fp16_opset14")


def export_bert_fp16() -> Path:
    from onnxconverter_common import float16
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(_tiny_bert_config(), add_pooling_layer=False).eval()
    _randomize_layernorms(model)
    proto = _export_ids_model(model, "last_hidden_state", OUT_DIR / "_bert_tmp.onnx")
    converted = float16.convert_float_to_float16(proto, keep_io_types=True)
    return _save(converted, "bert_tiny_fp16_keepio_opset14")


def main() -> int:
    print(f"torch {torch.__version__}, onnx {onnx.__version__}")
    for fn in (export_autocast_mlm, export_bert_fp16):
        path = fn()
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
