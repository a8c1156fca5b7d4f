"""Latency benchmark for one model, or two models head to head, on ONNX Runtime.

Both models get the same synthesized inputs. After a warm-up, runs are timed until both
``min_runs`` and ``min_time`` are reached (or ``max_time`` passes). With two models the
runs alternate A, B, A, B, ... inside one loop so that clock, cache and thermal drift hit
both alike, and the speedup is the median of the per-pair time ratios A/B.

On CPU the sessions run through ``InferenceSession.run``. On CUDA inputs are copied to the
device once and bound with IO binding, outputs stay on the device, and every timed run
ends with an output synchronization, so a run's time is the device time of the graph
rather than host-device copies.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import onnx
import onnxruntime as ort

from lnfuse.errors import InputError
from lnfuse.runtime import (
    LEVELS,
    ModelLike,
    ProviderChoice,
    load_model_proto,
    make_session,
    select_provider,
    session_feeds,
    synthesize_inputs,
    validate_feeds,
)

__all__ = ["BenchResult", "LevelResult", "Timing", "bench"]

# Show a progress bar only when the whole benchmark is expected to take longer than this.
_PROGRESS_AFTER_S = 1.5


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one model at one level, in milliseconds."""

    runs: int
    min_ms: float
    median_ms: float
    p90_ms: float
    mean_ms: float

    @classmethod
    def from_ns(cls, samples: Sequence[int]) -> Timing:
        ms = np.asarray(samples, dtype=np.float64) / 1e6
        return cls(
            runs=len(ms),
            min_ms=float(ms.min()),
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "min_ms": self.min_ms,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
        }


@dataclass(frozen=True)
class LevelResult:
    """Timings at one graph-optimization level; ``ratio_median`` is median(A/B)."""

    level: str
    a: Timing
    b: Timing | None = None
    ratio_median: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "a": self.a.to_dict(),
            "b": None if self.b is None else self.b.to_dict(),
            "ratio_median": self.ratio_median,
        }


@dataclass(frozen=True)
class BenchResult:
    """All levels of one benchmark plus the provider that actually ran."""

    provider: str
    provider_reason: str
    levels: list[LevelResult]
    threads: int | None = None
    spinning: bool | None = None
    model_a: str = "A"
    model_b: str | None = None
    inputs: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "threads": self.threads,
            "spinning": self.spinning,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "inputs": self.inputs or {},
            "levels": [lv.to_dict() for lv in self.levels],
        }

    def render_text(self) -> str:
        threads = "default" if self.threads is None else str(self.threads)
        spin = {None: "default", True: "on", False: "off"}[self.spinning]
        lines = [f"provider: {self.provider} ({self.provider_reason})"]
        lines.append(f"threads: {threads}    spinning: {spin}")
        lines.append(f"A: {self.model_a}")
        if self.model_b is not None:
            lines.append(f"B: {self.model_b}")
        if self.inputs:
            desc = ", ".join(f"{n} {v['dtype']}{v['shape']}" for n, v in self.inputs.items())
            lines.append(f"inputs: {desc}")
        rows = [("level", "model", "runs", "min ms", "median ms", "p90 ms")]
        notes: dict[int, str] = {}
        for lv in self.levels:
            for label, timing in (("A", lv.a), ("B", lv.b)):
                if timing is None:
                    continue
                rows.append(
                    (
                        lv.level,
                        label,
                        str(timing.runs),
                        f"{timing.min_ms:.4f}",
                        f"{timing.median_ms:.4f}",
                        f"{timing.p90_ms:.4f}",
                    )
                )
            if lv.ratio_median is not None:
                r = lv.ratio_median
                if abs(r - 1.0) < 0.005:
                    word = "same speed (1.00x)"
                else:
                    word = f"{r:.2f}x faster" if r > 1 else f"{1 / r:.2f}x slower"
                notes[len(rows) - 1] = f"B vs A at {lv.level}: {word} (median of per-pair A/B time ratios)"
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            if i in notes:
                lines.append(f"  -> {notes[i]}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- runners


class _CpuRunner:
    """Plain ``InferenceSession.run`` with host inputs and outputs."""

    def __init__(self, sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> None:
        self.sess = sess
        self.feeds = dict(feeds)

    def __call__(self) -> None:
        self.sess.run(None, self.feeds)


class _CudaRunner:
    """IO binding with device-resident inputs and outputs; synchronizes every run."""

    def __init__(
        self, sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], device_id: int = 0
    ) -> None:
        self.sess = sess
        self.binding = sess.io_binding()
        self.device_id = device_id
        # Keep the device tensors alive for as long as the binding refers to them.
        self._inputs = []
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", device_id)
            self._inputs.append(value)
            self.binding.bind_ortvalue_input(name, value)
        self.output_names = [o.name for o in sess.get_outputs()]
        for name in self.output_names:
            self.binding.bind_output(name, "cuda", device_id)
        self.binding.synchronize_inputs()
        self._outputs: list[Any] | None = None

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        if self._outputs is None:
            # Re-use the buffers ORT allocated on the first run so later runs do not
            # allocate outputs (shapes are fixed: the inputs never change).
            self._outputs = list(self.binding.get_outputs())
            for name, value in zip(self.output_names, self._outputs, strict=True):
                self.binding.bind_ortvalue_output(name, value)


def _runner(
    sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], choice: ProviderChoice
) -> Callable[[], None]:
    if choice.name == "cuda" and sess.get_providers()[0] == "CUDAExecutionProvider":
        return _CudaRunner(sess, feeds)
    return _CpuRunner(sess, feeds)


# --------------------------------------------------------------------------- progress


class _Progress:
    """A one-line progress bar on a stream (normally stderr), throttled to ~10 Hz."""

    def __init__(self, stream: TextIO, total_levels: int, width: int = 30) -> None:
        self.stream = stream
        self.total = total_levels
        self.width = width
        self.last = 0.0
        self.shown = False

    def update(self, index: int, level: str, fraction: float) -> None:
        now = time.perf_counter()
        if now - self.last < 0.1 and fraction < 1.0:
            return
        self.last = now
        overall = (index + min(max(fraction, 0.0), 1.0)) / self.total
        filled = round(overall * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rbench [{bar}] {overall * 100:5.1f}%  level {level} ({index + 1}/{self.total})")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (self.width + 48) + "\r")
            self.stream.flush()
            self.shown = False


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# --------------------------------------------------------------------------- bench


def _label(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, onnx.ModelProto):
        return f"<model {model.graph.name or 'unnamed'}>"
    return "<model bytes>"


def _normalize_levels(levels: str | Sequence[str]) -> list[str]:
    if isinstance(levels, str):
        levels = ["disable", "all"] if levels == "both" else [levels]
    out = []
    for level in levels:
        if level not in LEVELS:
            raise InputError(f"unknown optimization level {level!r} (expected one of {', '.join(LEVELS)})")
        if level not in out:
            out.append(level)
    if not out:
        raise InputError("no optimization level to benchmark")
    return out


def bench(
    model_a: ModelLike,
    model_b: ModelLike | None = None,
    *,
    provider: str = "auto",
    levels: str | Sequence[str] = ("disable", "all"),
    threads: int | None = None,
    warmup: int = 10,
    min_runs: int = 30,
    min_time: float = 1.0,
    max_time: float = 30.0,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    spinning: bool | None = None,
) -> BenchResult:
    """Time ``model_a`` (and ``model_b``, alternating with it) at each level.

    ``threads`` sets ONNX Runtime's intra-op threads (CPU); ``spinning=False`` stops idle
    worker threads from spinning. With two models ``spinning=None`` means off: the idle
    session's spinning workers would otherwise steal cores from the session being timed
    (seen as 2-3x noise with 2 threads on a 2-core machine); one model keeps ORT's default. ``progress``: None shows a bar on stderr only when it is
    a terminal and the run is expected to take more than ~1.5 s; False never; True always.
    """
    _check_bench_args(warmup, min_runs, min_time, max_time, threads)
    level_names = _normalize_levels(levels)
    proto_a = load_model_proto(model_a)
    feeds = synthesize_inputs(proto_a, seed=seed, dims=dims)
    if model_b is not None:
        validate_feeds(load_model_proto(model_b), feeds, what="second model's inputs", allow_extra=True)
    choice = select_provider(provider)
    if spinning is None and model_b is not None:
        spinning = False

    stream = sys.stderr
    show = _is_tty(stream) if progress is None else bool(progress)
    bar = _Progress(stream, len(level_names)) if show else None
    results: list[LevelResult] = []
    actual = choice.primary
    try:
        for index, level in enumerate(level_names):
            actual, run_a, run_b = _level_runners(model_a, model_b, feeds, choice, level, threads, spinning)
            results.append(
                _time_level(
                    level,
                    run_a,
                    run_b,
                    warmup,
                    min_runs,
                    min_time,
                    max_time,
                    bar,
                    index,
                    len(level_names),
                    progress,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    reason = choice.reason if actual == choice.primary else f"{choice.reason}; session runs on {actual}"
    return BenchResult(
        provider=actual,
        provider_reason=reason,
        levels=results,
        threads=threads,
        spinning=spinning,
        model_a=_label(model_a),
        model_b=None if model_b is None else _label(model_b),
        inputs={n: {"dtype": str(v.dtype), "shape": list(v.shape)} for n, v in feeds.items()},
    )


def _check_bench_args(
    warmup: int, min_runs: int, min_time: float, max_time: float, threads: int | None
) -> None:
    """Returns nothing; raises :class:`InputError` for a count or time :func:`bench` cannot use."""
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")
    if min_runs < 1:
        raise InputError(f"min_runs must be >= 1, got {min_runs}")
    if min_time < 0 or max_time <= 0:
        raise InputError(f"min_time must be >= 0 and max_time > 0, got {min_time} and {max_time}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")


def _level_runners(
    model_a: ModelLike,
    model_b: ModelLike | None,
    feeds: Mapping[str, np.ndarray],
    choice: ProviderChoice,
    level: str,
    threads: int | None,
    spinning: bool | None,
) -> tuple[str, Callable[[], None], Callable[[], None] | None]:
    """The provider the first model's session runs on, and a runner per model at ``level``."""
    sess_a = make_session(model_a, choice, level, threads=threads, spinning=spinning)
    actual = sess_a.get_providers()[0]
    run_a = _runner(sess_a, session_feeds(sess_a, feeds, "first model"), choice)
    run_b = None
    if model_b is not None:
        sess_b = make_session(model_b, choice, level, threads=threads, spinning=spinning)
        run_b = _runner(sess_b, session_feeds(sess_b, feeds, "second model"), choice)
    return actual, run_a, run_b


def _time_level(
    level: str,
    run_a: Callable[[], None],
    run_b: Callable[[], None] | None,
    warmup: int,
    min_runs: int,
    min_time: float,
    max_time: float,
    bar: _Progress | None,
    index: int,
    n_levels: int,
    progress: bool | None,
) -> LevelResult:
    clock = time.perf_counter_ns
    warm_start = clock()
    for _ in range(warmup):
        run_a()
        if run_b is not None:
            run_b()
    per_pair_s = (clock() - warm_start) / 1e9 / warmup if warmup else 0.0
    expected = min(max_time, max(min_time, min_runs * per_pair_s))
    # In auto mode only bother with a bar when the whole benchmark is slow enough.
    if bar is not None and progress is None and expected * n_levels < _PROGRESS_AFTER_S:
        bar = None

    times_a: list[int] = []
    times_b: list[int] = []
    ratios: list[float] = []
    start = clock()
    min_ns = int(min_time * 1e9)
    max_ns = int(max_time * 1e9)
    while True:
        t0 = clock()
        run_a()
        t1 = clock()
        da = max(t1 - t0, 1)
        times_a.append(da)
        if run_b is not None:
            t2 = clock()
            run_b()
            t3 = clock()
            db = max(t3 - t2, 1)
            times_b.append(db)
            ratios.append(da / db)
        elapsed = clock() - start
        n = len(times_a)
        if (n >= min_runs and elapsed >= min_ns) or elapsed >= max_ns:
            break
        if bar is not None:
            done = min(n / min_runs, elapsed / min_ns if min_ns else 1.0)
            bar.update(index, level, max(done, elapsed / max_ns))
    if bar is not None:
        bar.update(index, level, 1.0)
    return LevelResult(
        level=level,
        a=Timing.from_ns(times_a),
        b=Timing.from_ns(times_b) if run_b is not None else None,
        ratio_median=float(statistics.median(ratios)) if ratios else None,
    )
