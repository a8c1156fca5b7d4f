"""Shared pytest setup: make the repository root importable so ``import models`` works, and
skip tests marked ``needs_opset(n)`` when the installed onnx does not know opset ``n``
(RMSNormalization needs opset 23, i.e. onnx >= 1.18; lnfuse itself supports onnx >= 1.14)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config: object) -> None:
    config.addinivalue_line(  # type: ignore[attr-defined]
        "markers", "needs_opset(n): skip when the installed onnx has no opset n"
    )


def pytest_runtest_setup(item: object) -> None:
    import onnx
    import pytest

    marker = item.get_closest_marker("needs_opset")  # type: ignore[attr-defined]
    if marker is not None and onnx.defs.onnx_opset_version() < marker.args[0]:
        pytest.skip(f"onnx {onnx.__version__} has no opset {marker.args[0]}")
