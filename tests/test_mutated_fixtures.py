"""Mutated fixtures: one small change to a committed model, and whatever lnfuse fuses must compute
the same.

Each case loads a random ``models/**/*.onnx`` and changes one thing: an element of a small constant
(an initializer or Constant node of at most 64 values: scaled, shifted, negated, zeroed, set to
1 / 2 / 3 / 0.5 / -0.5 / 1e-5, an integer moved by one), an ``axes`` / ``perm`` / ``keepdims`` /
``axis`` / ``epsilon`` attribute, the op of a binary arithmetic node, the operand order of Sub / Div
/ Pow, the op of a unary node (Sqrt, Reciprocal, Neg, Abs, Exp), ReduceMean <-> ReduceSum. A
mutant that fails ``check_model(full_check=True)`` or does not run is skipped. Every other one is
optimized (with and without ``rmsnorm``) and, when anything was fused, run against the original
on ONNX Runtime (``ORT_DISABLE_ALL``): integers exactly, floats within 1e-3 (fp16: 3e-2) of
``max(1, |reference|)``, non-finite only where the original is.

The test runs 40 seeded mutants; for a longer search::

    python tests/test_mutated_fixtures.py SEED COUNT
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import onnx
from graph_builder import random_feed, run_ort
from onnx import numpy_helper

import lnfuse
from lnfuse.protos import iter_graphs

FIXTURES = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "models").rglob("*.onnx"))
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64)
_ARITH = ("Add", "Sub", "Mul", "Div")
_UNARY = ("Sqrt", "Reciprocal", "Neg", "Abs", "Exp")


def _targets(m: onnx.ModelProto) -> list[tuple[str, object]]:
    """What a mutation may change: small tensors, int / float attributes, arithmetic nodes."""
    out: list[tuple[str, object]] = []
    for g in iter_graphs(m.graph):
        out += [("tensor", t) for t in g.initializer if _small(t)]
        for n in g.node:
            out += [
                ("tensor", a.t)
                for a in n.attribute
                if n.op_type == "Constant" and a.name == "value" and _small(a.t)
            ]
            out += [
                ("attr", a) for a in n.attribute if a.name in ("axes", "perm", "keepdims", "axis", "epsilon")
            ]
            if n.op_type in (*_ARITH, *_UNARY, "Pow", "ReduceMean", "ReduceSum"):
                out.append(("node", n))
    return out


def _small(t: onnx.TensorProto) -> bool:
    return t.data_type in _FLOATS and not t.external_data and 0 < int(np.prod(t.dims or [1])) <= 64


def _mutate_tensor(rng: random.Random, t: onnx.TensorProto) -> str:
    arr = numpy_helper.to_array(t).copy()
    flat = arr.reshape(-1)
    i = rng.randrange(flat.size)
    if arr.dtype.kind in "iu":
        flat[i] += rng.choice([-1, 1])
    else:
        how = rng.choice(["scale", "shift", "set"])
        if how == "scale":
            flat[i] *= rng.choice([1.001, 0.5, 2.0, -1.0, 0.0])
        elif how == "shift":
            flat[i] += rng.choice([1e-3, 0.1, 1.0])
        else:
            flat[i] = rng.choice([1.0, 2.0, 3.0, 0.5, -0.5, 1e-5])
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"{t.name}[{i}]"


def _mutate_node(rng: random.Random, n: onnx.NodeProto) -> str:
    if n.op_type in _ARITH and rng.random() < 0.5:
        n.op_type = rng.choice([o for o in _ARITH if o != n.op_type])
    elif n.op_type in ("Sub", "Div", "Pow") and len(n.input) == 2:
        n.input[0], n.input[1] = n.input[1], n.input[0]
    elif n.op_type in _UNARY:
        n.op_type = rng.choice([o for o in _UNARY if o != n.op_type])
    elif n.op_type in ("ReduceMean", "ReduceSum"):
        n.op_type = "ReduceSum" if n.op_type == "ReduceMean" else "ReduceMean"
    return f"{n.name}: {n.op_type}"


def mutate(rng: random.Random, m: onnx.ModelProto) -> str | None:
    """Change one thing in ``m`` (in place); what, or None when it has nothing to change."""
    targets = _targets(m)
    if not targets:
        return None
    kind, obj = rng.choice(targets)
    if kind == "tensor":
        return _mutate_tensor(rng, obj)  # type: ignore[arg-type]
    if kind == "node":
        return _mutate_node(rng, obj)  # type: ignore[arg-type]
    a: onnx.AttributeProto = obj  # type: ignore[assignment]
    if a.type == onnx.AttributeProto.INTS and a.ints:
        a.ints[rng.randrange(len(a.ints))] += rng.choice([-1, 1])
    elif a.type == onnx.AttributeProto.INT:
        a.i = 1 - a.i if a.name == "keepdims" else a.i + rng.choice([-1, 1])
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f *= rng.choice([10.0, 0.1, -1.0])
    return f"attribute {a.name}"


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype.kind != "f":
        return a.shape != b.shape or not np.array_equal(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    fin = np.isfinite(a64)
    if np.any(fin & ~np.isfinite(b64)):
        return True
    if not fin.any():
        return False
    tol = (3e-2 if a.dtype == np.float16 else 1e-3) * max(1.0, float(np.max(np.abs(a64[fin]))))
    return float(np.max(np.abs(a64[fin] - b64[fin]))) > tol


def search(seed: int, count: int) -> tuple[list[str], int]:
    """(the mutants whose fused output differs, how many fused ones were compared)."""
    rng = random.Random(seed)
    bad, compared = [], 0
    for k in range(count):
        path = rng.choice(FIXTURES)
        m = onnx.load(path)
        what = mutate(rng, m)
        try:
            onnx.checker.check_model(m, full_check=True)
            feed = random_feed(m, k)
            ref = run_ort(m, feed)
        except Exception:  # the mutant is not a valid model: nothing to compare
            continue
        for rms in (False, True):
            result = lnfuse.optimize(m, rmsnorm=rms)
            if result.changed:
                compared += 1
                if any(_differs(a, b) for a, b in zip(ref, run_ort(result.model, feed), strict=True)):
                    bad.append(f"{Path(path).name}: {what} (rmsnorm={rms})")
    return bad, compared


def test_mutated_fixtures_compute_the_same() -> None:
    bad, compared = search(seed=2026, count=40)
    assert compared >= 10
    assert not bad, bad


if __name__ == "__main__":
    found, n = search(int(sys.argv[1]), int(sys.argv[2]))
    print(f"{n} fused mutants compared, {len(found)} differ", *found, sep="\n")
