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

from pathlib import Path as _Path

# In a source checkout ``lnfuse.passes`` lives in ../passes (setuptools maps it into the
# wheel as lnfuse/passes); make it importable there too, e.g. when tests or
# ``python -m lnfuse`` run from the repository root and shadow the installed package.
_here = _Path(__file__).resolve().parent
if not (_here / "passes").is_dir() and (_here.parent / "passes" / "__init__.py").is_file():
    __path__.append(str(_here.parent))

from lnfuse import opset as opset  # noqa: E402
from lnfuse.api import OptimizeResult, optimize  # noqa: E402
from lnfuse.bench import bench  # noqa: E402
from lnfuse.check import assert_equivalent, check  # noqa: E402
from lnfuse.errors import InputError, LnfuseError, ProviderError, ValidationError  # noqa: E402
from lnfuse.report import Report  # noqa: E402

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
