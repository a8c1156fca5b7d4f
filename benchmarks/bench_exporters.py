"""Original vs fused latency of the real exporter fixtures (tf2onnx, Keras 3, paddle2onnx, jax2onnx).

    python benchmarks/bench_exporters.py                 # every fused fixture, batch dims = 64
    python benchmarks/bench_exporters.py --quick         # one per exporter family, shorter runs
    python benchmarks/bench_exporters.py --dim 16        # the size given to every dynamic dim

Each fixture in ``models/exported/{tf,keras3,paddle,jax}`` that lnfuse rewrites is fused in memory
(``rmsnorm=True``) and timed against its original with ``lnfuse.bench`` (alternating runs, CPU,
1 intra-op thread) at ORT_DISABLE_ALL and ORT_ENABLE_ALL. Prints the median times and the median
of the per-pair ratios original/fused (> 1: the fused model is faster); figures, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

import lnfuse

ROOT = Path(__file__).resolve().parent.parent / "models" / "exported"
FAMILIES = ("tf", "keras3", "paddle", "jax")


def _dynamic_dims(model: onnx.ModelProto, size: int) -> dict[str, int]:
    dims: dict[str, int] = {}
    for i in model.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param:
                dims[d.dim_param] = size
    return dims


def _fixtures(quick: bool) -> list[Path]:
    out = []
    for family in FAMILIES:
        paths = sorted((ROOT / family).glob("*.onnx"))
        out += paths[:3] if quick else paths
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dim", type=int, default=64, help="size of every dynamic input dim")
    args = ap.parse_args(argv)
    min_time = 0.3 if args.quick else 1.0
    print(f"{'fixture':48s} {'LN':>3s} {'level':8s} {'orig ms':>9s} {'fused ms':>9s} {'orig/fused':>10s}")
    slower = []
    for path in _fixtures(args.quick):
        original = onnx.load(path)
        if next(o.version for o in original.opset_import if o.domain in ("", "ai.onnx")) > 23:
            continue
        result = lnfuse.optimize(original, rmsnorm=True)
        if not result.changed:
            continue
        res = lnfuse.bench(
            original,
            result.model,
            provider="cpu",
            threads=1,
            min_time=min_time,
            dims=_dynamic_dims(original, args.dim),
            progress=False,
        )
        name = f"{path.parent.name}/{path.stem}"
        for lv in res.levels:
            assert lv.b is not None and lv.ratio_median is not None
            print(
                f"{name:48s} {len(result.report.matches):3d} {lv.level:8s} "
                f"{lv.a.median_ms:9.3f} {lv.b.median_ms:9.3f} {lv.ratio_median:9.2f}x"
            )
            if lv.ratio_median < 0.95:
                slower.append(f"{name} at {lv.level}: {lv.ratio_median:.2f}x")
        sys.stdout.flush()
    print("fused slower than the original (ratio < 0.95):", ", ".join(slower) if slower else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
