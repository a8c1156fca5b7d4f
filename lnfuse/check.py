"""Numeric-equivalence gate: run an original and a candidate model on the same inputs.

Both models run on the same execution provider at the same graph-optimization level
(``disable`` by default, so ONNX Runtime's own fusions cannot hide a bug) with the same
seeded inputs, for ``runs`` seeds plus one large-magnitude run. Outputs are matched by
name; each element passes when::

    |candidate - original| <= atol + rtol * |original|

with the tolerance of the narrowest float type the original computes through on the way to
that output (:func:`lnfuse.precision.output_tolerances`: an fp32 output of a model that runs
fp16 inside is compared at fp16's tolerance, a pure fp32 model at fp32's; explicit
``rtol``/``atol`` override it); integer and bool outputs must match exactly. Non-finite values: NaN vs NaN and the same infinity vs itself are equal; NaN/Inf
in the candidate where the original is finite is always a failure; NaN/Inf in the original
where the candidate is finite is a failure unless ``allow_fixed_overflow`` (then it is
reported as a fixed overflow).

Fixed overflow inside the original (``allow_fixed_overflow`` only): a decomposed fp16
LayerNorm on a GPU squares ``x - mean`` in fp16, gets inf, and its output collapses to
beta -- finite but wrong. When a run fails (or the original alone is non-finite), the
original is run again on that run's inputs with every float tensor of its main graph
exposed as an extra output. The run's float mismatches become fixed overflows when the
candidate's outputs are all finite and some intermediate upstream of the mismatching
output went non-finite from finite inputs (the first such intermediate is named), and
feeding that exposed value back into the original reproduces the original's outputs. The
last test rejects values that only look overflowed when exposed: ONNX Runtime's CPU
provider computes fp16 ops it has no fp16 kernel for in fp32, so an exposed fp16 square
reads inf while the chain itself never overflowed.

Reported per output and run: max abs error, max rel error (``|a-b| / max(|ref|, tiny)``
element-wise, ``tiny`` the dtype's smallest normal number), and the worst index (the
element with the largest ``|a-b| / (atol + rtol*|ref|)``, or the first non-finite
mismatch if there is one).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lnfuse.errors import InputError
from lnfuse.precision import CHECK_TOLERANCES, Basis, Tolerance, narrowest_inside, output_tolerances
from lnfuse.precision import subgraph_reads as _subgraph_reads
from lnfuse.runtime import (
    LEVELS,
    ModelLike,
    ProviderChoice,
    graph_input_specs,
    load_inputs_npz,
    load_model_proto,
    make_session,
    select_provider,
    session_feeds,
    synthesize_inputs,
    validate_feeds,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "CheckResult",
    "OutputComparison",
    "assert_equivalent",
    "check",
    "compare_arrays",
    "expose_intermediates",
    "tolerances_for",
]

#: (rtol, atol) by dtype name: :data:`lnfuse.precision.CHECK_TOLERANCES` (why each value).
#: An output is compared at the tolerance of the narrowest float type the original computes
#: through on the way to it (:func:`lnfuse.precision.output_tolerances`), not only its dtype's.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    kind.dtype_name: tol for kind, tol in CHECK_TOLERANCES.items()
}

# Scale of the large-magnitude run by the widest-risk float input dtype.
_LARGE_SCALE = {"float16": 300.0, "float32": 1000.0, "float64": 1000.0}
_CHUNK = 1 << 22  # elements compared at a time (bounds float64 temporaries)

InputsLike = Union[Mapping[str, np.ndarray], str, "os.PathLike[str]", None]


def tolerances_for(dtype: Any, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for an output of ``dtype``; explicit values override the defaults.

    Integer, bool and other non-float dtypes compare exactly: (0.0, 0.0).
    """
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DEFAULT_TOLERANCES:
        return 0.0, 0.0
    d_rtol, d_atol = DEFAULT_TOLERANCES[name]
    return (d_rtol if rtol is None else float(rtol)), (d_atol if atol is None else float(atol))


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class OutputComparison:
    """One output of one run: how far the candidate is from the original."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...] | None
    ok: bool
    reason: str
    run_label: str = ""
    mismatched: int = 0
    total: int = 0
    fixed_overflow: int = 0
    rtol: float = 0.0
    atol: float = 0.0
    #: The original's intermediate that overflowed (fixed overflow found by re-running it).
    overflow_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run": self.run_label,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "ok": self.ok,
            "reason": self.reason,
            "mismatched": self.mismatched,
            "total": self.total,
            "fixed_overflow": self.fixed_overflow,
            "overflow_at": self.overflow_at or None,
            "rtol": self.rtol,
            "atol": self.atol,
        }

    def describe(self) -> str:
        """One line naming the output, the run, the errors and the worst index."""
        where = "" if self.worst_index is None else f" at index {self.worst_index}"
        run = f" (run {self.run_label})" if self.run_label else ""
        return (
            f"output '{self.name}'{run}: max abs err {_fmt(self.max_abs)}, max rel err {_fmt(self.max_rel)}"
            f"{where}: {self.reason}"
        )


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def _failure(name: str, reason: str, run_label: str, ref: np.ndarray | None = None) -> OutputComparison:
    dtype = "" if ref is None else str(ref.dtype)
    shape = () if ref is None else tuple(int(s) for s in ref.shape)
    return OutputComparison(name, dtype, shape, math.nan, math.nan, None, False, reason, run_label)


def _run_atol(label: str, ref: np.ndarray, rtol: float | None, atol: float | None) -> float | None:
    """Absolute tolerance for one run: in the large-magnitude run it scales with the output.

    Inputs there are ~1000x larger; every value the model computes (not only the norms) grows
    with them, and cancellations such as ``gamma * n + beta`` leave elements whose own
    magnitude says nothing about the rounding they carry. So the run is judged relative to
    the output's largest magnitude (a norm-wise bound), never looser than the dtype's atol.
    """
    if not label.startswith("large") or ref.dtype.kind != "f" or ref.size == 0:
        return atol
    r_tol, a_tol = tolerances_for(ref.dtype, rtol, atol)
    finite = np.abs(ref[np.isfinite(ref)].astype(np.float64))
    if finite.size == 0:
        return atol
    return max(a_tol, r_tol * float(finite.max()))


def compare_arrays(
    name: str,
    ref: Any,
    got: Any,
    rtol: float | None = None,
    atol: float | None = None,
    allow_fixed_overflow: bool = False,
    run_label: str = "",
) -> OutputComparison:
    """Compare candidate output ``got`` with original output ``ref`` (see module doc).

    ``rtol``/``atol`` of ``None`` take the per-dtype defaults.
    """
    ref = np.asarray(ref)
    got = np.asarray(got)
    shape = tuple(int(s) for s in ref.shape)
    if ref.dtype != got.dtype:
        return _failure(name, f"dtype differs: original {ref.dtype}, candidate {got.dtype}", run_label, ref)
    if ref.shape != got.shape:
        return _failure(
            name, f"shape differs: original {shape}, candidate {tuple(got.shape)}", run_label, ref
        )
    r_tol, a_tol = tolerances_for(ref.dtype, rtol, atol)
    total = int(ref.size)
    if np.issubdtype(ref.dtype, np.floating) or ref.dtype.name == "bfloat16":
        return _compare_float(name, ref, got, r_tol, a_tol, allow_fixed_overflow, run_label)
    return _compare_exact(name, ref, got, run_label, total)


def _compare_exact(
    name: str, ref: np.ndarray, got: np.ndarray, run_label: str, total: int
) -> OutputComparison:
    shape = tuple(int(s) for s in ref.shape)
    if ref.dtype.kind in "biu":
        a = ref.astype(np.float64)
        b = got.astype(np.float64)
        neq = ref != got
        diff = np.abs(a - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        rel = diff / np.maximum(np.abs(a), 1.0)
        max_rel = float(rel.max()) if rel.size else 0.0
    else:
        neq = ref != got
        max_abs = max_rel = float(bool(np.any(neq)))
        diff = neq.astype(np.float64)
    bad = int(np.count_nonzero(neq))
    worst = None
    if bad:
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(neq, diff, -1.0))), ref.shape))
        reason = f"{bad} of {total} elements differ (exact match required for {ref.dtype})"
    else:
        reason = "ok"
    return OutputComparison(
        name,
        str(ref.dtype),
        shape,
        max_abs,
        max_rel,
        worst,
        bad == 0,
        reason,
        run_label,
        bad,
        total,
        0,
        0.0,
        0.0,
    )


@dataclass(frozen=True)
class _FloatStats:
    """Running totals of a float comparison over the chunks seen so far."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_ratio: float = -1.0
    worst_flat: int | None = None
    first_nonfinite: int | None = None
    n_tol: int = 0
    n_cand_bad: int = 0
    n_orig_bad: int = 0
    n_both_bad: int = 0

    def merge(self, later: _FloatStats) -> _FloatStats:
        """The totals of these chunks followed by ``later``'s."""
        take_later = later.worst_ratio > self.worst_ratio
        return _FloatStats(
            max_abs=max(self.max_abs, later.max_abs),
            max_rel=max(self.max_rel, later.max_rel),
            worst_ratio=later.worst_ratio if take_later else self.worst_ratio,
            worst_flat=later.worst_flat if take_later else self.worst_flat,
            first_nonfinite=self.first_nonfinite
            if self.first_nonfinite is not None
            else later.first_nonfinite,
            n_tol=self.n_tol + later.n_tol,
            n_cand_bad=self.n_cand_bad + later.n_cand_bad,
            n_orig_bad=self.n_orig_bad + later.n_orig_bad,
            n_both_bad=self.n_both_bad + later.n_both_bad,
        )


def _float_tiny(dtype: np.dtype) -> float:
    """The smallest normal number of ``dtype`` (float32's when numpy has no finfo for it)."""
    try:
        return float(np.finfo(dtype).tiny)
    except Exception:
        return float(np.finfo(np.float32).tiny)


def _chunk_stats(
    a: np.ndarray,
    b: np.ndarray,
    start: int,
    rtol: float,
    atol: float,
    tiny: float,
    allow_fixed_overflow: bool,
) -> _FloatStats:
    """The totals of one chunk (float64 ``a`` original, ``b`` candidate) starting at flat ``start``."""
    fin_a = np.isfinite(a)
    fin_b = np.isfinite(b)
    both = fin_a & fin_b
    with np.errstate(invalid="ignore", over="ignore"):
        same_nonfinite = ~fin_a & ~fin_b & ((np.isnan(a) & np.isnan(b)) | (a == b))
    cand_bad = fin_a & ~fin_b
    orig_bad = ~fin_a & fin_b
    both_bad = ~fin_a & ~fin_b & ~same_nonfinite
    hard = cand_bad | both_bad
    if not allow_fixed_overflow:
        hard = hard | orig_bad
    counts = _FloatStats(
        first_nonfinite=start + int(np.argmax(hard)) if hard.any() else None,
        n_cand_bad=int(np.count_nonzero(cand_bad)),
        n_orig_bad=int(np.count_nonzero(orig_bad)),
        n_both_bad=int(np.count_nonzero(both_bad)),
    )
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both, np.abs(np.where(both, a, 0.0) - np.where(both, b, 0.0)), 0.0)
    absa = np.abs(np.where(both, a, 0.0))
    if not diff.size:
        return counts
    tol = atol + rtol * absa
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, diff / np.where(tol > 0, tol, 1.0), np.where(diff > 0, np.inf, 0.0))
    ratio = np.where(both, ratio, -1.0)
    idx = int(np.argmax(ratio))
    return replace(
        counts,
        max_abs=float(diff.max()),
        max_rel=float((diff / np.maximum(absa, tiny)).max()),
        worst_ratio=float(ratio[idx]),
        worst_flat=start + idx,
        n_tol=int(np.count_nonzero(ratio > 1.0)),
    )


def _float_reason(
    stats: _FloatStats, total: int, rtol: float, atol: float, allow_fixed_overflow: bool
) -> str:
    """The reason line of a float comparison: every kind of mismatch, or ok (with any fixed overflow)."""
    reasons = []
    if stats.n_cand_bad:
        reasons.append(f"candidate has NaN/Inf where the original is finite ({stats.n_cand_bad} elements)")
    if stats.n_both_bad:
        reasons.append(f"NaN/Inf values differ ({stats.n_both_bad} elements)")
    if stats.n_orig_bad and not allow_fixed_overflow:
        reasons.append(
            f"original has NaN/Inf where the candidate is finite ({stats.n_orig_bad} elements; "
            "use --allow-fixed-overflow to accept)"
        )
    if stats.n_tol:
        reasons.append(f"{stats.n_tol} of {total} elements exceed atol={atol:g} + rtol={rtol:g}*|ref|")
    if reasons:
        return "; ".join(reasons)
    fixed = stats.n_orig_bad if allow_fixed_overflow else 0
    if fixed:
        return f"ok; fixed overflow: {fixed} elements non-finite in the original are finite in the candidate"
    return "ok"


def _compare_float(
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    rtol: float,
    atol: float,
    allow_fixed_overflow: bool,
    run_label: str,
) -> OutputComparison:
    shape = tuple(int(s) for s in ref.shape)
    total = int(ref.size)
    tiny = _float_tiny(ref.dtype)
    flat_a = ref.reshape(-1)
    flat_b = got.reshape(-1)
    stats = _FloatStats()
    for start in range(0, total, _CHUNK):
        a = flat_a[start : start + _CHUNK].astype(np.float64)
        b = flat_b[start : start + _CHUNK].astype(np.float64)
        stats = stats.merge(_chunk_stats(a, b, start, rtol, atol, tiny, allow_fixed_overflow))
    fixed = stats.n_orig_bad if allow_fixed_overflow else 0
    bad = (
        stats.n_tol + stats.n_cand_bad + stats.n_both_bad + (0 if allow_fixed_overflow else stats.n_orig_bad)
    )
    flat_worst = stats.first_nonfinite if stats.first_nonfinite is not None else stats.worst_flat
    worst = (
        None
        if flat_worst is None or total == 0
        else tuple(int(i) for i in np.unravel_index(flat_worst, ref.shape))
    )
    return OutputComparison(
        name,
        str(ref.dtype),
        shape,
        stats.max_abs,
        stats.max_rel,
        worst,
        bad == 0,
        _float_reason(stats, total, rtol, atol, allow_fixed_overflow),
        run_label,
        bad,
        total,
        fixed,
        rtol,
        atol,
    )


# --------------------------------------------------------------------------- fixed overflow

#: Element types exposed by :func:`expose_intermediates` (numpy cannot hold bfloat16).
_EXPOSED_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
_REPLAY_SUFFIX = "__lnfuse_overflow_replay"
_MAX_REPLAYS = 4  # intermediates tried per run, at most


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor whose type is known (shape inference first)."""
    graph = model.graph
    # Custom ops or a > 2 GiB proto can stop inference: then keep what the model declares.
    with contextlib.suppress(Exception):
        graph = onnx.shape_inference.infer_shapes(model).graph
    types: dict[str, int] = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type:
            types[value.name] = int(value.type.tensor_type.elem_type)
    for init in graph.initializer:
        types.setdefault(init.name, int(init.data_type))
    return types


def expose_intermediates(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose graph outputs also list every float node output of the main graph.

    Types come from shape inference; a tensor whose type is unknown is skipped, and so are
    tensors inside subgraphs (If/Loop/Scan bodies), which a graph output cannot name.
    Returns the copy and the names added, in node order. ``model`` is not modified.
    """
    return _expose(model, _value_types(model))


def _expose(model: onnx.ModelProto, types: Mapping[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {o.name for o in model.graph.output}
    added: list[str] = []
    for node in model.graph.node:
        for name in node.output:
            if not name or name in taken or types.get(name) not in _EXPOSED_TYPES:
                continue
            taken.add(name)
            added.append(name)
            copy.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    return copy, added


def _nonfinite_kinds(arr: np.ndarray) -> str:
    a = np.asarray(arr)
    kinds = []
    if np.isposinf(a).any():
        kinds.append("inf")
    if np.isneginf(a).any():
        kinds.append("-inf")
    if np.isnan(a).any():
        kinds.append("NaN")
    return ", ".join(kinds)


def _all_finite(arr: Any) -> bool:
    a = np.asarray(arr)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        return True
    return bool(np.isfinite(a).all())


@dataclass(frozen=True)
class _Overflow:
    """An intermediate of the original that went non-finite from finite inputs."""

    name: str
    kinds: str


class _OverflowProbe:
    """Re-runs the original with its intermediates exposed (made lazily, reused across runs)."""

    def __init__(
        self, original: ModelLike, proto: onnx.ModelProto, choice: ProviderChoice, level: str
    ) -> None:
        self._original = original
        self._proto = proto
        self._choice = choice
        self._level = level
        self._full: onnx.ModelProto | None = None
        self._exposed: Any = None
        self._replays: dict[str, Any] = {}
        self._types: dict[str, int] = {}
        graph = proto.graph
        self._producer: dict[str, int] = {}
        self._reads: list[list[str]] = []
        for i, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    self._producer[name] = i
            self._reads.append([n for n in node.input if n] + sorted(_subgraph_reads(node)))
        self._inits = {init.name: init for init in graph.initializer}
        self._graph_outputs = {o.name for o in graph.output}

    def _full_model(self) -> onnx.ModelProto:
        if self._full is None:
            if isinstance(self._original, (str, os.PathLike)):
                self._full = load_model_proto(self._original, load_external_data=True)
            else:
                self._full = self._proto
        return self._full

    def _session(self) -> Any:
        if self._exposed is None:
            self._types = _value_types(self._full_model())
            exposed, _ = _expose(self._full_model(), self._types)
            self._exposed = make_session(exposed, self._choice, self._level, exact_fp32=True)
        return self._exposed

    def ancestors(self, output: str) -> set[str]:
        """Every tensor ``output`` depends on in the main graph, ``output`` included."""
        seen = {output}
        stack = [output]
        while stack:
            idx = self._producer.get(stack.pop())
            if idx is None:
                continue
            for name in self._reads[idx]:
                if name not in seen:
                    seen.add(name)
                    stack.append(name)
        return seen

    def _known(self, name: str, values: Mapping[str, np.ndarray]) -> np.ndarray | None:
        if name in values:
            return values[name]
        init = self._inits.get(name)
        if init is None:
            return None
        try:
            return numpy_helper.to_array(init)
        except Exception:  # external data that was not loaded
            return None

    def find(
        self,
        feeds: Mapping[str, np.ndarray],
        outs_a: Mapping[str, np.ndarray],
        needed: set[str],
    ) -> tuple[list[_Overflow], str]:
        """Overflows of the original on ``feeds`` upstream of ``needed`` outputs, verified by replay.

        Returns the overflows (node order) and, when there are none, a line saying why.
        """
        try:
            sess = self._session()
            names = [o.name for o in sess.get_outputs()]
            got = sess.run(names, session_feeds(sess, feeds, "original model"))
        except Exception as exc:
            return [], f"the original could not be re-run with its intermediates exposed: {_first_line(exc)}"
        values = dict(feeds)
        values.update(zip(names, got, strict=True))
        for name, ref in outs_a.items():
            if not compare_arrays(name, ref, values[name]).ok:
                return (
                    [],
                    "exposing the original's intermediates changes its outputs on this provider and level",
                )
        upstream: set[str] = set()
        for name in needed:
            upstream |= self.ancestors(name)
        candidates: list[_Overflow] = []
        any_nonfinite = False
        for idx, node in enumerate(self._proto.graph.node):
            for name in node.output:
                if not name or name not in values or _all_finite(values[name]):
                    continue
                any_nonfinite = True
                if name not in upstream or not self._reads[idx]:
                    continue
                inputs = [self._known(n, values) for n in self._reads[idx]]
                if all(arr is None or _all_finite(arr) for arr in inputs):
                    candidates.append(_Overflow(name, _nonfinite_kinds(values[name])))
        if not any_nonfinite:
            return [], "the original has no non-finite intermediate on this run"
        if not candidates:
            return [], "no intermediate upstream of this output went non-finite from finite inputs"
        verified: list[_Overflow] = []
        rejected: list[str] = []
        for cand in candidates[:_MAX_REPLAYS]:
            why = self._replay(cand.name, feeds, values, outs_a)
            if why is None:
                verified.append(cand)
            else:
                rejected.append(f"'{cand.name}' {why}")
        if verified:
            return verified, ""
        return [], "; ".join(rejected)

    def _replay(
        self,
        name: str,
        feeds: Mapping[str, np.ndarray],
        values: Mapping[str, np.ndarray],
        outs_a: Mapping[str, np.ndarray],
    ) -> str | None:
        """None when feeding the exposed value of ``name`` back reproduces the original's outputs.

        An fp16 tensor a provider keeps in fp32 internally reads inf when exposed (cast back to
        fp16 for the output) although its consumers saw the finite fp32 value; replaying the
        exposed inf then changes the outputs.
        """
        if name in self._graph_outputs:
            return None  # a graph output is what the original really returned
        try:
            sess = self._replays.get(name)
            if sess is None:
                model = onnx.ModelProto()
                model.CopyFrom(self._full_model())
                producer = model.graph.node[self._producer[name]]
                producer.output[list(producer.output).index(name)] = name + _REPLAY_SUFFIX
                model.graph.input.append(helper.make_tensor_value_info(name, self._types[name], None))
                sess = make_session(model, self._choice, self._level, exact_fp32=True)
                self._replays[name] = sess
            replay_feeds = dict(feeds)
            replay_feeds[name] = values[name]
            outs = sess.run(list(outs_a), session_feeds(sess, replay_feeds, "replayed original"))
        except Exception as exc:
            return f"could not be replayed: {_first_line(exc)}"
        for out, ref, got in zip(outs_a, outs_a.values(), outs, strict=True):
            if not compare_arrays(out, ref, got).ok:
                return (
                    f"reads {_nonfinite_kinds(values[name])} when exposed, but feeding that value back "
                    f"changes output '{out}': the provider keeps it in a wider type, so it did not overflow"
                )
        return None


def _needs_probe(comp: OutputComparison) -> bool:
    return comp.dtype in DEFAULT_TOLERANCES and (comp.mismatched > 0 or comp.fixed_overflow > 0)


def _apply_fixed_overflow(
    probe: _OverflowProbe,
    comps: list[OutputComparison],
    feeds: Mapping[str, np.ndarray],
    outs_a: Mapping[str, np.ndarray],
    outs_b: Mapping[str, np.ndarray],
) -> list[OutputComparison]:
    """Turn a run's float mismatches into fixed overflows where the original overflowed internally."""
    if not any(_needs_probe(c) for c in comps):
        return comps
    bad_cand = [n for n, arr in outs_b.items() if not _all_finite(arr)]
    if bad_cand:
        note = f"not a fixed overflow: the candidate is non-finite too (output '{bad_cand[0]}')"
        return [
            replace(c, reason=f"{c.reason}; {note}") if not c.ok and _needs_probe(c) else c for c in comps
        ]
    needed = {c.name for c in comps if _needs_probe(c)}
    overflows, why = probe.find(feeds, outs_a, needed)
    result = []
    for comp in comps:
        if not _needs_probe(comp):
            result.append(comp)
            continue
        upstream = probe.ancestors(comp.name)
        hit = next((o for o in overflows if o.name in upstream), None)
        if hit is None:
            if not comp.ok:
                comp = replace(
                    comp, reason=f"{comp.reason}; not a fixed overflow: {why or 'no overflow upstream'}"
                )
            result.append(comp)
            continue
        fixed = comp.fixed_overflow + comp.mismatched
        reason = (
            f"ok; fixed overflow: original overflowed internally at '{hit.name}' ({hit.kinds}); "
            f"candidate finite ({fixed} of {comp.total} element(s) accepted)"
        )
        result.append(
            replace(comp, ok=True, mismatched=0, fixed_overflow=fixed, reason=reason, overflow_at=hit.name)
        )
    return result


# --------------------------------------------------------------------------- check


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check`: every output of every run, and the verdict."""

    ok: bool
    provider: str
    provider_reason: str
    level: str
    outputs: tuple[OutputComparison, ...]
    run_labels: tuple[str, ...]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The tolerance each output was compared with, and why (lnfuse.precision).
    tolerances: tuple[Tolerance, ...] = ()

    @property
    def failures(self) -> list[OutputComparison]:
        """The comparisons that failed."""
        return [c for c in self.outputs if not c.ok]

    @property
    def fixed_overflows(self) -> list[OutputComparison]:
        """Comparisons where the candidate is finite where the original overflowed."""
        return [c for c in self.outputs if c.fixed_overflow]

    @property
    def failing_outputs(self) -> list[str]:
        """Names of failing outputs, in order of first failure, without repeats."""
        return list(dict.fromkeys(c.name for c in self.failures))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verdict": "equal" if self.ok else "not equal",
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "level": self.level,
            "runs": list(self.run_labels),
            "inputs": self.inputs,
            "failing_outputs": self.failing_outputs,
            "fixed_overflow": sum(c.fixed_overflow for c in self.outputs),
            "fixed_overflow_at": list(dict.fromkeys(c.overflow_at for c in self.outputs if c.overflow_at)),
            "tolerances": [t.to_dict() for t in self.tolerances],
            "outputs": [c.to_dict() for c in self.outputs],
        }

    def failure_message(self) -> str:
        """One line (per failing output) describing what differs; empty if ok."""
        if self.ok:
            return ""
        firsts: dict[str, OutputComparison] = {}
        for comp in self.failures:
            firsts.setdefault(comp.name, comp)
        return "models are not equivalent: " + "; ".join(c.describe() for c in firsts.values())

    def render_text(self) -> str:
        lines = [f"provider: {self.provider} ({self.provider_reason})"]
        lines.append(f"level: {self.level}    runs: {', '.join(self.run_labels) or 'none'}")
        lines += self._tolerance_lines()
        header = ("output", "dtype", "shape", "max abs", "max rel", "worst index", "run", "status")
        rows = [header]
        for comp in self._worst_per_output():
            shape = "x".join(str(s) for s in comp.shape) if comp.shape else "()" if comp.dtype else "-"
            worst = "-" if comp.worst_index is None else ",".join(str(i) for i in comp.worst_index) or "()"
            status = "ok" if comp.ok else "FAIL"
            if comp.ok and any(c.fixed_overflow for c in self.outputs if c.name == comp.name):
                status = "ok (fixed overflow)"
            rows.append(
                (
                    comp.name,
                    comp.dtype or "-",
                    shape,
                    _fmt(comp.max_abs),
                    _fmt(comp.max_rel),
                    worst,
                    comp.run_label or "-",
                    status,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        for comp in self._first_fixed_per_output():
            run = f" (run {comp.run_label})" if comp.run_label else ""
            detail = comp.reason.removeprefix("ok; ").removeprefix("fixed overflow: ")
            lines.append(
                f"  fixed overflow: output '{comp.name}'{run}: {detail}; max abs err {_fmt(comp.max_abs)}"
            )
        if self.ok:
            n_out = len({c.name for c in self.outputs})
            verdict = (
                f"verdict: EQUAL ({n_out} output(s) within tolerance over {len(self.run_labels)} run(s))"
            )
            fixed = sum(c.fixed_overflow for c in self.outputs)
            if fixed:
                verdict += (
                    f"; {fixed} element(s) accepted because the original overflowed and the candidate "
                    "did not (fixed overflow)"
                )
            lines.append(verdict)
        else:
            for comp in self._worst_per_output():
                if comp.ok:
                    continue
                runs = [c for c in self.failures if c.name == comp.name]
                note = f" [failed in {len(runs)} of {len(self.run_labels)} run(s)]" if len(runs) > 1 else ""
                lines.append(f"  {comp.describe()}{note}")
            names = ", ".join(f"'{n}'" for n in self.failing_outputs)
            lines.append(f"verdict: NOT EQUAL (failing output(s): {names})")
        return "\n".join(lines)

    def _tolerance_lines(self) -> list[str]:
        """The rule, then the tolerance of every float output and why."""
        floats = [t for t in self.tolerances if t.basis is not Basis.EXACT]
        if not floats:
            return []
        large = any(c.run_label.startswith("large") for c in self.outputs)
        note = "  (large-magnitude run: atol >= rtol*max|ref|)" if large else ""
        lines = [f"tolerance: |a-b| <= atol + rtol*|ref|{note}"]
        lines += [f"  {t.output}: {t.describe()}" for t in floats]
        return lines

    def _first_fixed_per_output(self) -> list[OutputComparison]:
        chosen: dict[str, OutputComparison] = {}
        for comp in self.fixed_overflows:
            if comp.ok:
                chosen.setdefault(comp.name, comp)
        return list(chosen.values())

    def _worst_per_output(self) -> list[OutputComparison]:
        chosen: dict[str, OutputComparison] = {}
        for comp in self.outputs:
            cur = chosen.get(comp.name)
            if cur is None or _badness(comp) > _badness(cur):
                chosen[comp.name] = comp
        return list(chosen.values())


def _badness(comp: OutputComparison) -> tuple[int, float]:
    value = comp.max_abs if math.isfinite(comp.max_abs) else math.inf
    return (0 if comp.ok else 1, value)


def _float_dtypes(model: onnx.ModelProto) -> set[str]:
    names = set()
    for spec in graph_input_specs(model):
        name = spec.type_name
        if name in ("float", "float16", "double"):
            names.add({"float": "float32", "double": "float64"}.get(name, name))
    return names


def _run_plan(
    proto: onnx.ModelProto,
    runs: int,
    seed: int,
    dims: Mapping[str, int] | None,
    input_ranges: Mapping[str, tuple[float, float]] | None,
    inputs: InputsLike,
    large_magnitude: bool,
) -> list[tuple[str, dict[str, np.ndarray]]]:
    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            return [("inputs", load_inputs_npz(inputs, proto))]
        return [("inputs", validate_feeds(proto, dict(inputs)))]
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    plan = [
        (f"seed={seed + r}", synthesize_inputs(proto, seed=seed + r, dims=dims, input_ranges=input_ranges))
        for r in range(runs)
    ]
    ranged = set(input_ranges or {})
    float_specs = [
        s
        for s in graph_input_specs(proto)
        if s.type_name in ("float", "float16", "double") and s.name not in ranged
    ]
    if large_magnitude and float_specs:
        kinds = _float_dtypes(proto)
        inside = narrowest_inside(proto)  # fp16 inside an fp32 graph: fp16's scale
        if inside is not None and inside.dtype_name in _LARGE_SCALE:
            kinds.add(inside.dtype_name)
        scale = min(_LARGE_SCALE[k] for k in kinds) if kinds else _LARGE_SCALE["float32"]
        feeds = synthesize_inputs(proto, seed=seed, dims=dims, input_ranges=input_ranges, scale=scale)
        plan.append((f"large(scale={scale:g})", feeds))
    return plan


def _describe_inputs(feeds: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": str(arr.dtype), "shape": list(arr.shape)} for name, arr in feeds.items()}


def check(
    original: ModelLike,
    candidate: ModelLike,
    *,
    provider: str = "auto",
    level: str = "disable",
    runs: int = 2,
    rtol: float | None = None,
    atol: float | None = None,
    dims: Mapping[str, int] | None = None,
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
    inputs: InputsLike = None,
    seed: int = 0,
    large_magnitude: bool = True,
    allow_fixed_overflow: bool = False,
) -> CheckResult:
    """Run ``original`` and ``candidate`` on identical inputs and compare every output.

    Inputs are synthesized from the original's declared inputs for seeds ``seed ..
    seed+runs-1`` plus, when ``large_magnitude`` and the model has float inputs, one run at
    a large scale (300 for float16 inputs, 1000 otherwise). ``inputs`` (a mapping or an
    ``.npz`` path) replaces all synthesized runs with exactly those inputs.

    ``allow_fixed_overflow`` accepts a run's float mismatches when the original overflowed
    and the candidate did not: either the original's output itself is NaN/Inf where the
    candidate's is finite, or -- found by re-running the original on that run's inputs with
    its intermediates exposed, only for runs that fail -- an intermediate upstream of the
    output went non-finite (named in the reason and in ``overflow_at``). Off by default.

    Raises :class:`InputError` for unreadable models or inputs that do not fit, and
    :class:`ProviderError` if ``provider='cuda'`` cannot start. Numeric differences are
    reported in the result (``ok`` False), not raised.
    """
    pair = _open_pair(original, candidate, provider, level)
    comparisons = _unmatched_outputs(pair.names_a, pair.names_b)
    plan = _run_plan(pair.proto_a, runs, seed, dims, input_ranges, inputs, large_magnitude)
    tolerances = output_tolerances(pair.proto_a, rtol, atol)
    probe: _OverflowProbe | None = None  # made on the first run that needs it
    for label, feeds in plan:
        run_comps, probe = _check_run(
            pair, label, feeds, tolerances, (rtol, atol), allow_fixed_overflow, probe
        )
        comparisons.extend(run_comps)

    return CheckResult(
        ok=all(c.ok for c in comparisons),
        provider=pair.provider,
        provider_reason=pair.reason,
        level=level,
        outputs=tuple(comparisons),
        run_labels=tuple(label for label, _ in plan),
        inputs=_describe_inputs(plan[0][1]) if plan else {},
        tolerances=tuple(t for t in tolerances.values() if t.output in set(pair.common)),
    )


@dataclass(frozen=True)
class _Pair:
    """The original and the candidate, each with a session on the same provider and level."""

    original: ModelLike
    proto_a: onnx.ModelProto
    proto_b: onnx.ModelProto
    choice: ProviderChoice
    level: str
    sess_a: Any
    sess_b: Any
    provider: str
    reason: str
    names_a: list[str]
    names_b: list[str]
    common: list[str]


def _open_pair(original: ModelLike, candidate: ModelLike, provider: str, level: str) -> _Pair:
    """Both models loaded, with sessions, the provider that really runs them and their output names."""
    if level not in LEVELS:
        raise InputError(f"unknown optimization level {level!r} (expected one of {', '.join(LEVELS)})")
    proto_a = load_model_proto(original)
    proto_b = load_model_proto(candidate)
    choice = select_provider(provider)
    sess_a = make_session(original, choice, level, exact_fp32=True)
    sess_b = make_session(candidate, choice, level, exact_fp32=True)
    actual = sess_a.get_providers()[0]
    reason = choice.reason
    if actual != choice.primary:
        reason = f"{reason}; session runs on {actual}"
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    common = [n for n in names_a if n in set(names_b)]
    return _Pair(
        original, proto_a, proto_b, choice, level, sess_a, sess_b, actual, reason, names_a, names_b, common
    )


def _unmatched_outputs(names_a: list[str], names_b: list[str]) -> list[OutputComparison]:
    """A failure for every output only one of the two models has (the original's first)."""
    missing = [_failure(n, "output missing in the candidate", "all") for n in names_a if n not in names_b]
    extra = [_failure(n, "output not in the original", "all") for n in names_b if n not in names_a]
    return missing + extra


def _check_run(
    pair: _Pair,
    label: str,
    feeds: Mapping[str, np.ndarray],
    tolerances: Mapping[str, Tolerance],
    given: tuple[float | None, float | None],
    allow_fixed_overflow: bool,
    probe: _OverflowProbe | None,
) -> tuple[list[OutputComparison], _OverflowProbe | None]:
    """One run's comparisons, and the overflow probe (made here when this run is the first to need it)."""
    validate_feeds(pair.proto_b, feeds, what=f"candidate inputs ({label})", allow_extra=True)
    feeds_a = session_feeds(pair.sess_a, feeds, "original model")
    feeds_b = session_feeds(pair.sess_b, feeds, "candidate model")
    try:
        outs_a = pair.sess_a.run(pair.common or pair.names_a, feeds_a)
    except Exception as exc:
        raise InputError(
            f"original model failed to run on {label} inputs {_shapes(feeds_a)}: {_first_line(exc)}"
        ) from None
    if not pair.common:
        return [], probe
    try:
        outs_b = pair.sess_b.run(pair.common, feeds_b)
    except Exception as exc:
        return [_failure("*", f"candidate failed to run: {_first_line(exc)}", label)], probe
    run_comps = [
        _compare_output(name, ref, got, tolerances.get(name), given, allow_fixed_overflow, label)
        for name, ref, got in zip(pair.common, outs_a, outs_b, strict=True)
    ]
    if allow_fixed_overflow and any(_needs_probe(c) for c in run_comps):
        if probe is None:
            probe = _OverflowProbe(pair.original, pair.proto_a, pair.choice, pair.level)
        run_comps = _apply_fixed_overflow(
            probe,
            run_comps,
            feeds_a,
            dict(zip(pair.common, outs_a, strict=True)),
            dict(zip(pair.common, outs_b, strict=True)),
        )
    return run_comps, probe


def _compare_output(
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    tol: Tolerance | None,
    given: tuple[float | None, float | None],
    allow_fixed_overflow: bool,
    label: str,
) -> OutputComparison:
    """:func:`compare_arrays` at the output's policy tolerance (its dtype's when the model does not say)."""
    rtol, atol = given
    if tol is not None and tol.basis is not Basis.EXACT and ref.dtype.kind == "f":
        rtol, atol = tol.rtol, tol.atol
    return compare_arrays(
        name, ref, got, rtol, _run_atol(label, ref, rtol, atol), allow_fixed_overflow, label
    )


def _shapes(feeds: Mapping[str, np.ndarray]) -> str:
    return "{" + ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feeds.items()) + "}"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def assert_equivalent(original: ModelLike, candidate: ModelLike, **kwargs: Any) -> CheckResult:
    """:func:`check` for tests: raise AssertionError naming the failing output(s), the
    max abs/rel error and the worst index; return the result when equal."""
    result = check(original, candidate, **kwargs)
    if not result.ok:
        raise AssertionError(result.failure_message())
    return result
