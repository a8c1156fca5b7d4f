"""Fuse decomposed RMS normalization into ONNX ``RMSNormalization`` (opset >= 23). Opt-in.

    y = x / sqrt(mean(x**2) + eps) * Scale,   statistics over axes [axis, rank)

What T5 / LLaMA exports write (often inside a Cast island: fp16 x cast to fp32,
Pow 2, ReduceMean, Add eps, Sqrt, Reciprocal, Mul, cast back, Mul weight). Only
enabled with ``rmsnorm=True`` / ``--rmsnorm``; the opset is raised to 23 only when
that is exact, otherwise every RMSNorm found is reported and left as it is.
Never emits contrib (com.microsoft) ops.
"""

from __future__ import annotations

from lnfuse.pipeline import NormPass, PassContext
from lnfuse.rules import NormRule
from lnfuse.symbolic import NormKind


class RMSNormPass(NormPass):
    name = "rms-norm"
    description = "decomposed RMSNorm -> RMSNormalization (opset 23, opt-in: --rmsnorm)"

    def __init__(self) -> None:
        self.rule = NormRule(NormKind.RMS)

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.rmsnorm
