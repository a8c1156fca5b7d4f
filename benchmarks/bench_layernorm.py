"""Micro-benchmark: decomposed LayerNorm vs one fused LayerNormalization on ONNX Runtime.

Builds LayerNorm micro-models with onnx.helper for several ``rows x hidden`` sizes, in
float32 and float16, in two decomposed forms:

* ``pytorch``: ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta
* ``recip``:   ReduceMean, Sub, Mul(d, d), ReduceMean, Add eps, Sqrt, Reciprocal, Mul,
  Mul gamma, Add beta

The fused model comes from ``lnfuse.optimize(model).model`` when lnfuse provides it,
otherwise it is built by hand (one LayerNormalization, opset 17, stash_type=1). Each
pair is timed with :func:`lnfuse.bench.bench` at ORT_DISABLE_ALL and ORT_ENABLE_ALL with 1
and 2 intra-op threads, checked for numeric agreement with
:func:`lnfuse.check.compare_arrays`, and each fused time is shown as a multiple of the
read-once/write-once memory bound (rows*hidden*bytes*2 / measured copy bandwidth).

Usage: python benchmarks/bench_layernorm.py [--quick] [--json] [--provider auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lnfuse
from lnfuse.bench import bench
from lnfuse.check import compare_arrays
from lnfuse.errors import LnfuseError
from lnfuse.runtime import make_session, select_provider, synthesize_inputs

SIZES = [(64, 768), (4096, 768), (32768, 768), (4096, 4096)]
DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}
FORMS = ("pytorch", "recip")
THREADS = (1, 2)
LEVELS = ("disable", "all")
EPS = 1e-5


# --------------------------------------------------------------------------- models


def _params(hidden: int, np_dtype: type) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(1234)
    gamma = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np_dtype)
    beta = (0.1 * rng.standard_normal(hidden)).astype(np_dtype)
    return [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], elem: int, rows: int, hidden: int, name: str
):
    x = helper.make_tensor_value_info("x", elem, [rows, hidden])
    y = helper.make_tensor_value_info("y", elem, [rows, hidden])
    graph = helper.make_graph(nodes, name, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_decomposed(rows: int, hidden: int, dtype: str, form: str) -> onnx.ModelProto:
    """The decomposed LayerNorm in ``form`` ('pytorch' or 'recip'), whole chain in ``dtype``."""
    elem, np_dtype = DTYPES[dtype]
    inits = [*_params(hidden, np_dtype), numpy_helper.from_array(np.array(EPS, np_dtype), "eps")]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
    ]
    if form == "pytorch":
        inits.append(numpy_helper.from_array(np.array(2.0, np_dtype), "two"))
        nodes += [
            helper.make_node("Pow", ["d", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Div", ["d", "std"], ["normed"]),
        ]
    elif form == "recip":
        nodes += [
            helper.make_node("Mul", ["d", "d"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Reciprocal", ["std"], ["inv"]),
            helper.make_node("Mul", ["d", "inv"], ["normed"]),
        ]
    else:
        raise ValueError(f"unknown form {form}")
    nodes += [
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, inits, elem, rows, hidden, f"ln_{form}_{dtype}")


def build_fused_by_hand(rows: int, hidden: int, dtype: str) -> onnx.ModelProto:
    """One LayerNormalization (opset 17, axis -1, stash_type=1) with the same parameters."""
    elem, np_dtype = DTYPES[dtype]
    node = helper.make_node(
        "LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=EPS, stash_type=1
    )
    return _model([node], _params(hidden, np_dtype), elem, rows, hidden, f"ln_fused_{dtype}")


def fused_model(
    decomposed: onnx.ModelProto, rows: int, hidden: int, dtype: str
) -> tuple[onnx.ModelProto, str]:
    """Fuse with ``lnfuse.optimize`` when available, else build the fused model by hand."""
    optimize = getattr(lnfuse, "optimize", None)
    if optimize is not None:
        try:
            model = optimize(decomposed).model
        except Exception as exc:  # report and fall back: the benchmark still runs
            return build_fused_by_hand(rows, hidden, dtype), f"hand-built (optimize failed: {exc})"
        if any(n.op_type == "LayerNormalization" for n in model.graph.node):
            return model, "lnfuse.optimize"
        return build_fused_by_hand(rows, hidden, dtype), "hand-built (optimize did not fuse)"
    return build_fused_by_hand(rows, hidden, dtype), "hand-built"


# --------------------------------------------------------------------------- measurements


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Single-threaded numpy copy bandwidth in bytes/s, counting bytes read + written."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


@dataclass(frozen=True)
class Plan:
    warmup: int
    min_runs: int
    min_time: float
    max_time: float


def plan_for(rows: int, hidden: int, quick: bool) -> Plan:
    elements = rows * hidden
    if elements <= 1 << 16:
        return Plan(10, 60, 0.15, 1.0) if quick else Plan(20, 200, 0.4, 2.0)
    if elements <= 1 << 22:
        return Plan(2, 10, 0.1, 1.0) if quick else Plan(3, 20, 0.3, 2.0)
    return Plan(1, 3, 0.0, 1.5) if quick else Plan(1, 5, 0.2, 2.0)


def agreement(decomposed: onnx.ModelProto, fused: onnx.ModelProto, provider: str) -> dict[str, Any]:
    """Run both models once (ORT_DISABLE_ALL) on the same input and compare outputs."""
    choice = select_provider(provider)
    feeds = synthesize_inputs(decomposed, seed=0)
    ref = make_session(decomposed, choice, "disable").run(None, feeds)[0]
    got = make_session(fused, choice, "disable").run(None, feeds)[0]
    comp = compare_arrays("y", ref, got)
    return {"ok": comp.ok, "max_abs": comp.max_abs, "max_rel": comp.max_rel, "reason": comp.reason}


def run(quick: bool, provider: str) -> dict[str, Any]:
    sizes = SIZES[:2] if quick else SIZES
    bandwidth = copy_bandwidth(64 << 20 if quick else 256 << 20)
    choice = select_provider(provider)
    records: list[dict[str, Any]] = []
    for rows, hidden in sizes:
        plan = plan_for(rows, hidden, quick)
        for dtype, (_, np_dtype) in DTYPES.items():
            bound_ms = rows * hidden * np.dtype(np_dtype).itemsize * 2 / bandwidth * 1e3
            for form in FORMS:
                decomposed = build_decomposed(rows, hidden, dtype, form)
                fused, fused_by = fused_model(decomposed, rows, hidden, dtype)
                check = agreement(decomposed, fused, provider)
                for threads in THREADS if choice.name == "cpu" else (None,):
                    result = bench(
                        decomposed,
                        fused,
                        provider=provider,
                        levels=LEVELS,
                        threads=threads,
                        warmup=plan.warmup,
                        min_runs=plan.min_runs,
                        min_time=plan.min_time,
                        max_time=plan.max_time,
                        progress=False,
                    )
                    for lv in result.levels:
                        assert lv.b is not None and lv.ratio_median is not None
                        records.append(
                            {
                                "rows": rows,
                                "hidden": hidden,
                                "dtype": dtype,
                                "form": form,
                                "threads": threads,
                                "level": lv.level,
                                "decomposed_ms": lv.a.median_ms,
                                "fused_ms": lv.b.median_ms,
                                "speedup": lv.ratio_median,
                                "runs": lv.a.runs,
                                "bound_ms": bound_ms,
                                "fused_vs_bound": lv.b.median_ms / bound_ms,
                                "fused_by": fused_by,
                                "check_ok": check["ok"],
                                "check_max_abs": check["max_abs"],
                                "provider": result.provider,
                            }
                        )
                    print(
                        f"  done {rows}x{hidden} {dtype} {form} threads={threads}",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "provider": choice.primary,
        "provider_reason": choice.reason,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "records": records,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"provider: {report['provider']} ({report['provider_reason']})",
        f"memory bandwidth (numpy copy, 1 thread, read+write): {report['copy_bandwidth_gbs']:.1f} GB/s",
        "bound = rows*hidden*bytes*2 / bandwidth (read x once, write y once); times are medians",
    ]
    header = (
        "size",
        "dtype",
        "form",
        "thr",
        "level",
        "decomp ms",
        "fused ms",
        "speedup",
        "fused/bound",
        "max abs err",
        "check",
    )
    rows = [header]
    for r in report["records"]:
        rows.append(
            (
                f"{r['rows']}x{r['hidden']}",
                r["dtype"],
                r["form"],
                "-" if r["threads"] is None else str(r["threads"]),
                r["level"],
                f"{r['decomposed_ms']:.3f}",
                f"{r['fused_ms']:.3f}",
                f"{r['speedup']:.2f}x",
                f"{r['fused_vs_bound']:.1f}x",
                f"{r['check_max_abs']:.2e}",
                "ok" if r["check_ok"] else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    fused_by = sorted({r["fused_by"] for r in report["records"]})
    lines.append(f"fused models: {', '.join(fused_by)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two smallest sizes, fewer runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        report = run(args.quick, args.provider)
    except LnfuseError as err:
        print(f"bench_layernorm: error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if all(r["check_ok"] for r in report["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
