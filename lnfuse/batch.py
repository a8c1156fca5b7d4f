"""Many models in one command: ``lnfuse optimize A B DIR/ -o OUTDIR`` and ``lnfuse check DIR1 DIR2``.

* :func:`optimize_file` is the one-model code path; the single-model CLI and every batch worker
  call it, so a model is optimized, validated and written the same way in both.
* :func:`plan_optimize` / :func:`plan_check` turn the command line into jobs (a folder is searched
  for ``*.onnx``, ``*.ln.onnx`` outputs excluded; outputs keep their path relative to it).
* :func:`run_jobs` runs the jobs in spawned worker processes (``-j``; :func:`default_jobs` caps
  them by memory); one model's bad input, failure or crash is its own row, never another's.
* :func:`summary_text` / :func:`summary_json` render the rows; :func:`exit_code` is the batch's.
"""

from __future__ import annotations

import enum
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnfuse.errors import InputError, LnfuseError

__all__ = [
    "CheckOptions",
    "Job",
    "OptimizeOptions",
    "Outcome",
    "Row",
    "Status",
    "default_jobs",
    "exit_code",
    "optimize_file",
    "plan_check",
    "plan_optimize",
    "run_jobs",
    "summary_json",
    "summary_text",
]


class Status(enum.Enum):
    """How one model of a batch ended, and the exit code it stands for."""

    OK = "ok"
    NOT_EQUAL = "validation-failed"
    BAD_INPUT = "bad-input"
    ERROR = "internal-error"

    @property
    def code(self) -> int:
        return {"ok": 0, "validation-failed": 1, "bad-input": 2, "internal-error": 3}[self.value]


@dataclass(frozen=True)
class OptimizeOptions:
    """Everything ``lnfuse optimize`` passes on about one model (picklable, for the workers)."""

    rmsnorm: bool = False
    hoist: bool = True
    verify: bool = True
    allow_transpose: bool = True
    target_opset: int | None = None
    allow_invalid: bool = False
    validate: bool = False
    bench: bool = False
    provider: str = "auto"
    level: str = "disable"
    dims: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    allow_fixed_overflow: bool = False
    in_place: bool = False
    bench_progress: bool | None = None


@dataclass(frozen=True)
class CheckOptions:
    """What ``lnfuse check`` passes on to :func:`lnfuse.check.check` (picklable)."""

    kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- one model


@dataclass
class Outcome:
    """What :func:`optimize_file` did: the report, 0 or 1 (validation failed), where it wrote."""

    report: Any
    code: int
    written: Path | None
    failure_text: str = ""  # the check's text when validation failed


def optimize_file(model: Path, output: Path | None, opts: OptimizeOptions) -> Outcome:
    """Optimize one model file, validate/bench it on request, and write it (atomically).

    Raises :class:`LnfuseError` for bad input; a failed validation writes nothing (code 1).
    """
    from lnfuse import io as lio
    from lnfuse.api import optimize

    # --validate / --bench compare against the original, so it is loaded here and kept;
    # otherwise optimize() loads the file itself and may build the result in that copy
    # (no second copy of the weights).
    original = lio.load_model(model) if (opts.validate or opts.bench) else None
    out_path = lio.resolve_output_path(model, output, in_place=opts.in_place)
    result = optimize(
        original if original is not None else model,
        rmsnorm=opts.rmsnorm,
        hoist=opts.hoist,
        verify=opts.verify,
        allow_transpose=opts.allow_transpose,
        target_opset=opts.target_opset,
        allow_invalid=opts.allow_invalid,
        lazy_external=original is None,  # big external weights stay on disk, streamed at the save
    )
    report = result.report
    report.source = os.fspath(model)
    external = lio.has_external_data(model)  # remembered from the load: no second parse
    outcome = Outcome(report, 0, None)
    if opts.validate:
        from lnfuse.check import check

        res = check(
            original,
            result.model,
            provider=opts.provider,
            level=opts.level,
            dims=opts.dims,
            input_ranges=opts.ranges,
            allow_fixed_overflow=opts.allow_fixed_overflow,
        )
        report.validation = res.to_dict()
        if not res.ok:
            outcome.code, outcome.failure_text = 1, res.render_text()
    if opts.bench and outcome.code == 0:
        from lnfuse.bench import bench

        b = bench(
            original, result.model, provider=opts.provider, dims=opts.dims, progress=opts.bench_progress
        )
        report.benchmark = b.to_dict()
    if outcome.code == 0:
        # Mirror the input: external data in, external data out (one file next to the output).
        result.save(
            out_path, external_data=True if external else None, size_threshold=0 if external else 1024
        )
        outcome.written = out_path
    return outcome


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Job:
    """One unit of a batch: a model (and, for check, its candidate), shown as ``name``."""

    name: str
    source: Path
    output: Path | None = None  # optimize: where it goes (None = next to the source)
    candidate: Path | None = None  # check: the model compared with ``source``


def _models_in(root: Path) -> list[Path]:
    """``*.onnx`` under ``root`` (recursively, sorted), lnfuse's own ``*.ln.onnx`` outputs left out."""
    found = [p for p in root.rglob("*.onnx") if p.is_file() and not p.name.endswith(".ln.onnx")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _expand(inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(model, path relative to its folder or its own name) for every input."""
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            models = _models_in(item)
            if not models:
                raise InputError(f"{item}: no *.onnx models in this folder")
            pairs.extend((m, m.relative_to(item)) for m in models)
        else:
            pairs.append((item, Path(item.name)))
    return pairs


def plan_optimize(inputs: Sequence[Path], outdir: Path | None) -> list[Job]:
    """Jobs for ``lnfuse optimize`` with several inputs or a folder; ``outdir`` is a folder."""
    if outdir is not None and outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: with several models or a folder, -o names an output folder")
    jobs, seen = [], {}
    for model, rel in _expand(inputs):
        out = None if outdir is None else outdir / rel
        key = os.path.abspath(out if out is not None else model)
        if key in seen:
            raise InputError(f"{model} and {seen[key]} would both be written to {out or key}")
        seen[key] = model
        jobs.append(Job(os.fspath(model), model, out))
    return jobs


def plan_check(originals: Path, candidates: Path) -> list[Job]:
    """Pairs ORIGINAL_DIR/rel with CANDIDATE_DIR/rel, for every model under ORIGINAL_DIR."""
    if not candidates.is_dir():
        raise InputError(f"{candidates}: is not a folder (ORIGINAL is one, so CANDIDATE must be too)")
    return [Job(rel.as_posix(), m, None, candidates / rel) for m, rel in _expand([originals])]


# --------------------------------------------------------------------------- workers


@dataclass
class Row:
    """One model's line in the summary (and entry in the JSON document)."""

    name: str
    status: Status
    seconds: float = 0.0
    error: str = ""  # one line, naming the model
    fused: int | None = None
    refused: int | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    output: str | None = None
    detail: dict[str, Any] | None = None  # the model's optimize report or check result
    failure_text: str = ""


def _failed(job: Job, err: BaseException, t0: float) -> Row:
    if isinstance(err, LnfuseError):
        status = Status.NOT_EQUAL if err.exit_code == 1 else Status.BAD_INPUT
        msg = " ".join(str(err).split())
    else:
        status, first = Status.ERROR, (str(err).splitlines() or [""])[0]
        msg = f"internal error: {type(err).__name__}: {first}"
    if job.name not in msg and os.fspath(job.source) not in msg:
        msg = f"{job.name}: {msg}"
    return Row(job.name, status, time.perf_counter() - t0, error=msg)


def optimize_worker(job: Job, opts: OptimizeOptions) -> Row:
    """One model of ``lnfuse optimize``, in a worker: :func:`optimize_file`, then its row."""
    t0 = time.perf_counter()
    try:
        if job.output is not None:
            try:
                job.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f"cannot create {job.output.parent}: {err.strerror or err}") from None
        out = optimize_file(job.source, job.output, opts)
    except Exception as err:
        return _failed(job, err, t0)
    r = out.report
    detail = {**r.to_dict(), "output": os.fspath(out.written) if out.written else None}
    row = Row(job.name, Status.OK if out.code == 0 else Status.NOT_EQUAL, time.perf_counter() - t0)
    row.fused, row.refused, row.nodes_before, row.nodes_after = (
        len(r.matches),
        len(r.refusals),
        r.nodes_before,
        r.nodes_after,
    )
    row.output, row.detail, row.failure_text = detail["output"], detail, out.failure_text
    if out.code:
        failing = [o.get("name") for o in (r.validation or {}).get("failures", [])]
        row.error = f"{job.name}: validation failed for {', '.join(map(str, failing))}; nothing written"
    return row


def check_worker(job: Job, opts: CheckOptions) -> Row:
    """One pair of ``lnfuse check ORIGINAL_DIR CANDIDATE_DIR``, in a worker."""
    t0 = time.perf_counter()
    try:
        assert job.candidate is not None
        if not job.candidate.exists():
            raise InputError(f"{job.name}: no candidate {job.candidate}")
        from lnfuse.check import check

        res = check(os.fspath(job.source), os.fspath(job.candidate), **opts.kwargs)
    except Exception as err:
        return _failed(job, err, t0)
    row = Row(job.name, Status.OK if res.ok else Status.NOT_EQUAL, time.perf_counter() - t0)
    row.detail, row.output = res.to_dict(), os.fspath(job.candidate)
    if not res.ok:
        row.failure_text = res.render_text()
        row.error = f"{job.name}: not equal ({', '.join(res.failing_outputs)})"
    return row


# --------------------------------------------------------------------------- running

_BASE_NEED = 256 << 20  # interpreter, onnx, onnxruntime and a small graph in one worker


def _model_bytes(path: Path) -> int:
    """The model file plus the external data files it names (0 when unreadable)."""
    try:
        total = path.stat().st_size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b"location") < 0:
                return total
        import onnx

        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return 0
    from lnfuse.protos import iter_graphs

    names = {
        e.value
        for g in iter_graphs(model.graph)
        for t in g.initializer
        for e in t.external_data
        if e.key == "location"
    }
    return total + sum((path.parent / n).stat().st_size for n in names if (path.parent / n).is_file())


def estimated_need(path: Path) -> int:
    """Memory one worker needs for ``path``: 256 MiB + 2x the model's bytes (its data included).

    Measured peak RSS of ``lnfuse optimize`` is 1.7x the weights plus ~150 MiB (README).
    """
    return _BASE_NEED + 2 * _model_bytes(path)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_jobs(jobs: Sequence[Job]) -> int:
    """min(cores, available memory / the largest model's :func:`estimated_need`, number of jobs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    n = min(cores, max(1, len(jobs)))
    avail = _available_memory()
    if avail is not None and jobs:
        n = min(n, max(1, avail // max(estimated_need(j.source) for j in jobs)))
    return max(1, n)


def _pool(n: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))


def _alone(worker: Callable[..., Row], job: Job, opts: Any) -> Row:
    """Rerun one job in a pool of its own (after a worker died): a crash now is this job's."""
    t0 = time.perf_counter()
    with _pool(1) as pool:
        try:
            return pool.submit(worker, job, opts).result()
        except BrokenProcessPool:
            return _failed(job, RuntimeError("the worker process died while working on it"), t0)
        except Exception as err:
            return _failed(job, err, t0)


class _Progress:
    """click's progress bar on stderr with the model being worked on; silent when ``shown`` is False."""

    def __init__(self, jobs: Sequence[Job], label: str, shown: bool) -> None:
        import click

        self.jobs, self.done = jobs, [False] * len(jobs)
        self.bar = (
            click.progressbar(
                length=len(jobs),
                label=label,
                file=sys.stderr,
                show_pos=True,
                item_show_func=lambda name: name or "",
            )
            if shown
            else None
        )
        if self.bar is not None:
            self.bar.__enter__()
            self.bar.update(0, self._current())

    def _current(self) -> str | None:
        return next((j.name for j, d in zip(self.jobs, self.done, strict=True) if not d), None)

    def tick(self, i: int) -> None:
        self.done[i] = True
        if self.bar is not None:
            self.bar.update(1, self._current())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def run_jobs(
    worker: Callable[..., Row], jobs: Sequence[Job], opts: Any, n: int, label: str, progress: bool
) -> list[Row]:
    """Run ``worker(job, opts)`` for every job in ``n`` spawned processes; rows in job order.

    A worker that dies breaks the pool for every job still in it: those are rerun one at a
    time in pools of their own, so only the job that crashes again fails (with its own row).
    """
    from concurrent.futures import as_completed

    rows: dict[int, Row] = {}
    retry: list[int] = []
    bar = _Progress(jobs, label, progress)
    try:
        with _pool(max(1, n)) as pool:
            futures: dict[Future[Row], int] = {pool.submit(worker, j, opts): i for i, j in enumerate(jobs)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    rows[i] = fut.result()
                except BrokenProcessPool:
                    retry.append(i)
                    continue
                except Exception as err:  # the row could not come back (pickling, ...)
                    rows[i] = _failed(jobs[i], err, time.perf_counter())
                bar.tick(i)
        for i in sorted(retry):
            rows[i] = _alone(worker, jobs[i], opts)
            bar.tick(i)
    finally:
        bar.close()
    return [rows[i] for i in range(len(jobs))]


def exit_code(rows: Sequence[Row]) -> int:
    """0 all fine, 1 a validation failed, 2 a bad input (3 an internal error): the worst one."""
    return max((r.status.code for r in rows), default=0)


# --------------------------------------------------------------------------- rendering


def progress_shown(quiet: bool) -> bool:
    """Progress goes to stderr only when it is a terminal and --quiet was not given."""
    return not quiet and sys.stderr.isatty()


def run_command(
    worker: Callable[..., Row],
    plan: Sequence[Job],
    opts: Any,
    jobs: int | None,
    kind: str,
    as_json: bool,
    quiet: bool,
) -> int:
    """A batch command: run it, print each failure's one line (stderr) and the summary table
    or one JSON document (stdout); return its exit code."""
    import json

    import click

    n = jobs or default_jobs(plan)
    label = "optimizing" if kind == "optimize" else "checking"
    rows = run_jobs(worker, plan, opts, n, label, progress_shown(quiet))
    for row in rows:
        if row.failure_text and not as_json:
            click.echo(row.failure_text, err=True)
        if row.error:
            click.echo(f"lnfuse: error: {row.error}", err=True)
    if as_json:
        click.echo(json.dumps(summary_json(rows, kind, n), indent=2, default=str))
    else:
        click.echo(summary_text(rows, kind))
    return exit_code(rows)


def _cells(row: Row, kind: str) -> list[str]:
    secs = f"{row.seconds:.2f}"
    if kind == "check":
        d = row.detail or {}
        names = {c.get("name") for c in d.get("outputs", [])}
        shown = [str(len(names)), str(len(d.get("runs", []))), str(d.get("provider", ""))] if d else ["-"] * 3
        return [row.name, *shown, secs, row.status.value]
    if row.fused is None:
        return [row.name, "-", "-", "-", secs, row.status.value]
    nodes = f"{row.nodes_before} -> {row.nodes_after}"
    return [row.name, str(row.fused), str(row.refused), nodes, secs, row.status.value]


def summary_text(rows: Sequence[Row], kind: str) -> str:
    """The table printed at the end of a batch, and one line of counts."""
    head = (
        ["model", "outputs", "runs", "provider", "seconds", "status"]
        if kind == "check"
        else ["model", "fused", "refused", "nodes", "seconds", "status"]
    )
    table = [head, *(_cells(r, kind) for r in rows)]
    widths = [max(len(line[c]) for line in table) for c in range(len(head))]
    left = {0, len(head) - 1}
    lines = [
        "  ".join(
            cell.ljust(w) if c in left else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    counts = [
        f"{sum(r.status is s for r in rows)} {s.value}" for s in Status if any(r.status is s for r in rows)
    ]
    lines.append(f"{len(rows)} model{'s' if len(rows) != 1 else ''}: {', '.join(counts)}")
    return "\n".join(line.rstrip() for line in lines)


def summary_json(rows: Sequence[Row], kind: str, jobs: int) -> dict[str, Any]:
    """One document for the whole batch: every model's row (with its report) and the totals."""
    models = [
        {
            "model": r.name,
            "status": r.status.value,
            "seconds": round(r.seconds, 4),
            "error": r.error or None,
            **(
                {}
                if kind == "check"
                else {
                    "fused": r.fused,
                    "refused": r.refused,
                    "nodes_before": r.nodes_before,
                    "nodes_after": r.nodes_after,
                }
            ),
            ("candidate" if kind == "check" else "output"): r.output,
            ("check" if kind == "check" else "report"): r.detail,
        }
        for r in rows
    ]
    summary = {s.value: sum(r.status is s for r in rows) for s in Status}
    return {"command": kind, "jobs": jobs, "models": models, "summary": summary, "exit_code": exit_code(rows)}


class Spinner:
    """``lnfuse: <label> ... 3s`` on stderr, redrawn twice a second once a run passes ``after``
    seconds, and wiped at the end; nothing at all when ``shown`` is False."""

    def __init__(self, label: str, shown: bool, after: float = 2.0) -> None:
        self.label, self.shown, self.after = label, shown, after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0

    def _run(self) -> None:
        t0 = time.monotonic()
        if self._stop.wait(self.after):
            return
        while not self._stop.is_set():
            text = f"lnfuse: {self.label} ... {time.monotonic() - t0:.0f}s"
            sys.stderr.write("\r" + text.ljust(self._drawn))
            sys.stderr.flush()
            self._drawn = len(text)
            self._stop.wait(0.5)

    def __enter__(self) -> Spinner:
        if self.shown:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._drawn:
                sys.stderr.write("\r" + " " * self._drawn + "\r")
                sys.stderr.flush()
