"""lnfuse: find decomposed LayerNorm / RMSNorm in ONNX models, fuse them, and prove the result equal.

Public API::

    import lnfuse
    result = lnfuse.optimize("model.onnx")          # or an onnx.ModelProto
    onnx.save(result.model, "model.ln.onnx")        # result.report says what was fused and why not
    lnfuse.check("model.onnx", "model.ln.onnx")     # numeric equivalence on ONNX Runtime
    lnfuse.bench("model.onnx", "model.ln.onnx")     # latency side by side
    lnfuse.assert_equivalent(a, b)                  # pytest-friendly gate

``LayerNormalization`` is standard ONNX from opset 17 (``RMSNormalization`` from 23);
lnfuse raises a model's opset only when every op keeps its meaning.
"""

from __future__ import annotations

from lnfuse import opset as opset
from lnfuse.api import OptimizeResult, optimize
from lnfuse.bench import bench
from lnfuse.check import assert_equivalent, check
from lnfuse.errors import InputError, LnfuseError, ProviderError, ValidationError
from lnfuse.report import Report

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "LnfuseError",
    "OptimizeResult",
    "ProviderError",
    "Report",
    "ValidationError",
    "__version__",
    "assert_equivalent",
    "bench",
    "check",
    "optimize",
]
