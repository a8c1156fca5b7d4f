"""Fuse decomposed layer normalization into ONNX ``LayerNormalization`` (opset >= 17).

    y = (x - mean(x)) / sqrt(var(x) + eps) * Scale + B,   statistics over axes [axis, rank)

Recognised however it is written (see :mod:`lnfuse.symbolic`): PyTorch's
TorchScript export at opsets 11-16 (ReduceMean, Sub, Pow 2, ReduceMean, Add,
Sqrt, Div, Mul, Add), the mean computed twice, Mul(d, d), Sqrt/Reciprocal/Mul,
Div(1, Sqrt), Pow(-0.5) and Pow(0.5)/Div, Keras' ``x*s + (beta - mean*s)``, gamma
on the numerator, commuted operands, Cast islands (fp16 input cast up and the
result cast back), one-pass variance ``mean(x**2) - mean(x)**2``, unbiased variance
(``/(N-1)``, static N: ``eps' = eps*(N-1)/N``, Scale folded with ``sqrt((N-1)/N)``),
several trailing axes, and non-trailing axes (with Transposes). Epsilon is read
from the graph, never defaulted. Emission needs default-domain opset 17; the
optimizer raises the opset first when that is exact, or reports the norm as found
and leaves the model alone.
"""

from __future__ import annotations

from lnfuse.pipeline import NormPass, PassContext
from lnfuse.rules import NormRule
from lnfuse.symbolic import NormKind


class LayerNormPass(NormPass):
    name = "layer-norm"
    description = "decomposed LayerNorm -> LayerNormalization (opset 17)"

    def __init__(self) -> None:
        self.rule = NormRule(NormKind.LN)

    def enabled(self, ctx: PassContext) -> bool:
        return True
