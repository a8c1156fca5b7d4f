"""Benchmark: an unrolled LN-LSTM, original vs per-step fused vs hoisted, on ONNX Runtime CPU.

The model is built with ``onnx.helper`` in the structure PyTorch's TorchScript export
writes for a traced LN-LSTM (``models/export_torch.py``, ``LNLSTMCell``), at opset 14:

    per step t:  x_t   = Gather(x, t, axis=0)                       x: [T, B, I]
                 gates = LN_h(h @ Identity(W_h)) + LN_x(x_t @ Identity(W_x)) + bias
                 f, i, o, g = Split(gates, 4)
                 c = sigmoid(f) * c + sigmoid(i) * tanh(g)
                 h = sigmoid(o) * tanh(LN_c(c))

each LN written as PyTorch's decomposed chain (ReduceMean, Sub, Pow 2, ReduceMean,
Add eps, Sqrt, Div, Mul, Add) with per-step eps/exponent Constants, and one Identity
alias of each weight per step. Three variants:

* ``original``: the model above (3T decomposed LNs);
* ``fused``: ``lnfuse.optimize(model, hoist=False)``: 3T ``LayerNormalization`` nodes;
* ``hoisted``: ``lnfuse.optimize(model)``: the T input-side LNs become one MatMul over
  ``[T, B, I]`` and one ``LayerNormalization`` over ``[T, B, 4H]`` (axis -1), sliced per step.

Each variant runs at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL`` with 1 and 2 intra-op
threads (thread-pool spinning off, sequential execution). Timing: warm-up, then rounds
that run original / fused / hoisted back to back (rotating the order), medians of the
times and of the per-round ratios. Numeric agreement with the original (max abs error
over the outputs, relative to max(1, max |output|)) is printed per row. No PyTorch needed.

Usage: python benchmarks/bench_rnn.py [--steps 64] [--batch 16] [--hidden 256] [--input 256]
                                      [--budget 8] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lnfuse

EPS = 1e-5
VARIANTS = ("original", "fused", "hoisted")
LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
THREADS = (1, 2)


# --------------------------------------------------------------------------- model


def _decomposed_ln(x: str, out: str, p: str, gamma: str, beta: str) -> list[onnx.NodeProto]:
    """PyTorch's LN chain, with its own eps / exponent Constants (as the exporter writes them per step)."""
    f32 = np.float32
    nodes = [
        helper.make_node("Constant", [], [f"{p}/two"], value=numpy_helper.from_array(np.array(2.0, f32))),
        helper.make_node("Constant", [], [f"{p}/eps"], value=numpy_helper.from_array(np.array(EPS, f32))),
        helper.make_node("ReduceMean", [x], [f"{p}/mean"], axes=[-1]),
        helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/d"]),
        helper.make_node("Pow", [f"{p}/d", f"{p}/two"], [f"{p}/sq"]),
        helper.make_node("ReduceMean", [f"{p}/sq"], [f"{p}/var"], axes=[-1]),
        helper.make_node("Add", [f"{p}/var", f"{p}/eps"], [f"{p}/ve"]),
        helper.make_node("Sqrt", [f"{p}/ve"], [f"{p}/std"]),
        helper.make_node("Div", [f"{p}/d", f"{p}/std"], [f"{p}/n"]),
        helper.make_node("Mul", [f"{p}/n", gamma], [f"{p}/s"]),
        helper.make_node("Add", [f"{p}/s", beta], [out]),
    ]
    return nodes


def build_ln_lstm(steps: int, batch: int, hidden: int, inputs: int, seed: int = 0) -> onnx.ModelProto:
    """The unrolled LN-LSTM described in the module docstring (opset 14, decomposed LNs)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    g4 = 4 * hidden

    def ln_params(name: str, size: int) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array((1.0 + 0.1 * rng.standard_normal(size)).astype(f32), f"{name}.weight"),
            numpy_helper.from_array((0.1 * rng.standard_normal(size)).astype(f32), f"{name}.bias"),
        ]

    inits = [
        numpy_helper.from_array((rng.standard_normal((inputs, g4)) / np.sqrt(inputs)).astype(f32), "W_x"),
        numpy_helper.from_array((rng.standard_normal((hidden, g4)) / np.sqrt(hidden)).astype(f32), "W_h"),
        numpy_helper.from_array((0.1 * rng.standard_normal(g4)).astype(f32), "cell.bias"),
        numpy_helper.from_array(np.full(4, hidden, np.int64), "gate_split"),
        numpy_helper.from_array(np.zeros((batch, hidden), f32), "h_init"),
        numpy_helper.from_array(np.zeros((batch, hidden), f32), "c_init"),
        *ln_params("ln_x", g4),
        *ln_params("ln_h", g4),
        *ln_params("ln_c", hidden),
    ]
    nodes: list[onnx.NodeProto] = []
    h, c = "h_init", "c_init"
    for t in range(steps):
        p = f"step{t}"
        nodes += [
            helper.make_node(
                "Constant", [], [f"{p}/idx"], value=numpy_helper.from_array(np.array(t, np.int64))
            ),
            helper.make_node("Gather", ["x", f"{p}/idx"], [f"{p}/x_t"], axis=0),
            helper.make_node("Identity", ["W_x"], [f"{p}/W_x"]),
            helper.make_node("Identity", ["W_h"], [f"{p}/W_h"]),
            helper.make_node("MatMul", [h, f"{p}/W_h"], [f"{p}/wh"]),
        ]
        nodes += _decomposed_ln(f"{p}/wh", f"{p}/lnh", f"{p}/ln_h", "ln_h.weight", "ln_h.bias")
        nodes.append(helper.make_node("MatMul", [f"{p}/x_t", f"{p}/W_x"], [f"{p}/wx"]))
        nodes += _decomposed_ln(f"{p}/wx", f"{p}/lnx", f"{p}/ln_x", "ln_x.weight", "ln_x.bias")
        nodes += [
            helper.make_node("Add", [f"{p}/lnh", f"{p}/lnx"], [f"{p}/g0"]),
            helper.make_node("Add", [f"{p}/g0", "cell.bias"], [f"{p}/gates"]),
            helper.make_node(
                "Split", [f"{p}/gates", "gate_split"], [f"{p}/f", f"{p}/i", f"{p}/o", f"{p}/g"], axis=1
            ),
            helper.make_node("Sigmoid", [f"{p}/f"], [f"{p}/sf"]),
            helper.make_node("Sigmoid", [f"{p}/i"], [f"{p}/si"]),
            helper.make_node("Sigmoid", [f"{p}/o"], [f"{p}/so"]),
            helper.make_node("Tanh", [f"{p}/g"], [f"{p}/tg"]),
            helper.make_node("Mul", [f"{p}/sf", c], [f"{p}/fc"]),
            helper.make_node("Mul", [f"{p}/si", f"{p}/tg"], [f"{p}/ig"]),
            helper.make_node("Add", [f"{p}/fc", f"{p}/ig"], [f"{p}/c"]),
        ]
        nodes += _decomposed_ln(f"{p}/c", f"{p}/lnc", f"{p}/ln_c", "ln_c.weight", "ln_c.bias")
        nodes += [
            helper.make_node("Tanh", [f"{p}/lnc"], [f"{p}/tc"]),
            helper.make_node("Mul", [f"{p}/so", f"{p}/tc"], [f"{p}/h"]),
        ]
        h, c = f"{p}/h", f"{p}/c"
    nodes += [
        helper.make_node("Identity", [h], ["h_T"]),
        helper.make_node("Identity", [c], ["c_T"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ln_lstm_unrolled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, inputs])],
        [
            helper.make_tensor_value_info("h_T", TensorProto.FLOAT, [batch, hidden]),
            helper.make_tensor_value_info("c_T", TensorProto.FLOAT, [batch, hidden]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def variants(model: onnx.ModelProto) -> tuple[dict[str, onnx.ModelProto], list[str]]:
    """original / fused (hoist off) / hoisted, and the hoist report lines."""
    fused = lnfuse.optimize(model, hoist=False)
    hoisted = lnfuse.optimize(model)
    if not fused.changed or not hoisted.report.hoisted:
        raise SystemExit("lnfuse did not fuse / hoist the benchmark model")
    return {"original": model, "fused": fused.model, "hoisted": hoisted.model}, list(hoisted.report.hoisted)


# --------------------------------------------------------------------------- timing


def _session(model: onnx.ModelProto, level: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(
    models: dict[str, onnx.ModelProto],
    feed: dict[str, np.ndarray],
    reference: list[np.ndarray],
    level: str,
    threads: int,
    budget: float,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
) -> dict[str, Any]:
    """Alternate the variants round by round for about ``budget`` seconds; medians and ratios."""
    sessions = {k: _session(m, level, threads) for k, m in models.items()}
    err: dict[str, float] = {}
    for k, s in sessions.items():
        outs = s.run(None, feed)
        err[k] = max(
            float(np.max(np.abs(a.astype(np.float64) - b))) / max(1.0, float(np.max(np.abs(b))))
            for a, b in zip(outs, reference, strict=True)
        )
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget):
        for k in order[rounds % len(order) :] + order[: rounds % len(order)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    a, b, c = (np.array(times[k]) for k in VARIANTS)
    return {
        "level": level,
        "threads": threads,
        "rounds": rounds,
        "median_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
        "orig/fused": float(np.median(a / b)),
        "orig/hoisted": float(np.median(a / c)),
        "fused/hoisted": float(np.median(b / c)),
        "max_abs_err": err,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per row")
    ap.add_argument("--quick", action="store_true", help="T=8, short budget (smoke run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.budget = 8, 0.5

    t0 = time.perf_counter()
    model = build_ln_lstm(args.steps, args.batch, args.hidden, args.input)
    models, hoisted = variants(model)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((args.steps, args.batch, args.input)).astype(np.float32)}
    reference = _session(model, "disable", 1).run(None, feed)
    print(
        f"LN-LSTM T={args.steps} B={args.batch} H={args.hidden} I={args.input}, onnxruntime {ort.__version__} CPU; "
        f"built and optimized in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    for line in hoisted:
        print(f"hoisted: {line}", file=sys.stderr)
    counts = {
        k: sum(1 for n in m.graph.node if n.op_type in ("LayerNormalization", "MatMul", "ReduceMean"))
        for k, m in models.items()
    }
    rows = []
    for level in LEVELS:
        for threads in THREADS:
            print(f"  timing level={level} threads={threads} ...", file=sys.stderr)
            rows.append(
                measure(
                    models,
                    feed,
                    reference,
                    level,
                    threads,
                    budget=args.budget,
                    warmup=3 if args.quick else 10,
                    min_rounds=3 if args.quick else 15,
                    max_rounds=400,
                )
            )
    if args.json:
        print(json.dumps({"config": vars(args), "hoisted": hoisted, "rows": rows}, indent=2))
    else:
        header = (
            f"{'level':<8}{'thr':>4}{'rounds':>7}{'original ms':>13}{'fused ms':>10}{'hoisted ms':>12}"
            f"{'orig/fused':>12}{'orig/hoist':>12}{'fused/hoist':>13}{'rel err fused / hoisted':>27}"
        )
        print(header)
        print("-" * len(header))
        for r in rows:
            ms, e = r["median_ms"], r["max_abs_err"]
            print(
                f"{r['level']:<8}{r['threads']:>4}{r['rounds']:>7}{ms['original']:>13.2f}{ms['fused']:>10.2f}"
                f"{ms['hoisted']:>12.2f}{r['orig/fused']:>11.2f}x{r['orig/hoisted']:>11.2f}x"
                f"{r['fused/hoisted']:>12.2f}x{e['fused']:>14.1e} / {e['hoisted']:.1e}"
            )
        print(
            "nodes (LayerNormalization+MatMul+ReduceMean): "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; total {time.perf_counter() - t0:.0f}s"
        )
    worst = max(max(r["max_abs_err"].values()) for r in rows)
    ok = worst <= 1e-4
    print(f"numeric agreement: {'OK' if ok else 'MISMATCH'} (max error {worst:.1e} vs original, relative)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
