"""Click commands ``lnfuse check`` and ``lnfuse bench`` (registered on the main group).

``check`` exits 0 when the candidate is numerically equivalent to the original, 1 when
it is not, and 2 for unusable input (unreadable model, bad option value, inputs that do
not fit, an explicitly requested provider that cannot start). Errors print one line,
``lnfuse: error: <message>``, on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import click

from lnfuse.errors import InputError, LnfuseError
from lnfuse.runtime import LEVELS

__all__ = ["bench_cmd", "check_cmd", "parse_dims", "parse_ranges"]


def parse_dims(values: Iterable[str]) -> dict[str, int]:
    """Parse ``name=value`` items (value a positive integer) into a dict."""
    dims: dict[str, int] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"bad --dim {item!r}: expected name=value")
        try:
            value = int(raw.strip())
        except ValueError:
            raise InputError(f"bad --dim {item!r}: {raw.strip()!r} is not an integer") from None
        if value < 1:
            raise InputError(f"bad --dim {item!r}: the size must be >= 1")
        dims[name] = value
    return dims


def parse_ranges(values: Iterable[str]) -> dict[str, tuple[float, float]]:
    """Parse ``name=lo:hi`` items into ``{name: (lo, hi)}`` with finite ``lo < hi``."""
    ranges: dict[str, tuple[float, float]] = {}
    for item in values:
        name, sep, raw = item.rpartition("=")
        name = name.strip()
        lo_s, colon, hi_s = raw.partition(":")
        if not sep or not name or not colon:
            raise InputError(f"bad --input-range {item!r}: expected name=lo:hi")
        try:
            lo, hi = float(lo_s), float(hi_s)
        except ValueError:
            raise InputError(f"bad --input-range {item!r}: lo and hi must be numbers") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"bad --input-range {item!r}: need finite lo < hi")
        ranges[name] = (lo, hi)
    return ranges


def _run_guarded(ctx: click.Context, debug: bool, body: Callable[[], int]) -> None:
    """Run ``body``; map LnfuseError to a one-line message and its exit code."""
    try:
        code = body()
    except LnfuseError as err:
        if debug:
            raise
        click.echo(f"lnfuse: error: {err}", err=True)
        ctx.exit(err.exit_code)
        return
    ctx.exit(code)


def _emit_json(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False))


_PROVIDER = click.Choice(["auto", "cuda", "cpu"], case_sensitive=False)
_LEVEL = click.Choice(list(LEVELS), case_sensitive=False)


@click.command("check")
@click.argument("original", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--provider", type=_PROVIDER, default="auto", show_default=True, help="Execution provider.")
@click.option(
    "--level", type=_LEVEL, default="disable", show_default=True, help="ORT graph optimization level."
)
@click.option("--runs", type=click.IntRange(min=1), default=2, show_default=True, help="Seeded input sets.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: the precision policy).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: the precision policy).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", help="Size of a symbolic dimension.")
@click.option("--input-range", "ranges", multiple=True, metavar="NAME=LO:HI", help="Value range of an input.")
@click.option(
    "--inputs", "inputs_path", type=click.Path(dir_okay=False), default=None, help="Inputs from .npz."
)
@click.option("--seed", type=int, default=0, show_default=True, help="First input seed.")
@click.option("--no-large-magnitude", is_flag=True, help="Skip the large-magnitude input run.")
@click.option(
    "--allow-fixed-overflow",
    is_flag=True,
    help="Accept NaN/Inf in the original where the candidate is finite.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes for two folders (default: one per core, capped by memory).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress indication on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def check_cmd(
    ctx: click.Context,
    original: str,
    candidate: str,
    provider: str,
    level: str,
    runs: int,
    rtol: float | None,
    atol: float | None,
    dims: tuple[str, ...],
    ranges: tuple[str, ...],
    inputs_path: str | None,
    seed: int,
    no_large_magnitude: bool,
    allow_fixed_overflow: bool,
    as_json: bool,
    jobs: int | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Check that CANDIDATE computes the same outputs as ORIGINAL (exit 0 equal, 1 not, 2 bad input).

    With two folders, every ORIGINAL_DIR/**/*.onnx is checked against CANDIDATE_DIR at the same
    relative path, in worker processes, with a summary table (or one JSON document) at the end.
    """

    def body() -> int:
        from pathlib import Path

        from lnfuse.check import check

        for label, value in (("--rtol", rtol), ("--atol", atol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InputError(f"{label} must be a finite number >= 0, got {value}")
        kwargs: dict[str, Any] = dict(
            provider=provider.lower(),
            level=level.lower(),
            runs=runs,
            rtol=rtol,
            atol=atol,
            dims=parse_dims(dims),
            input_ranges=parse_ranges(ranges),
            inputs=inputs_path,
            seed=seed,
            large_magnitude=not no_large_magnitude,
            allow_fixed_overflow=allow_fixed_overflow,
        )
        if Path(original).is_dir():
            from lnfuse import batch

            plan = batch.plan_check(Path(original), Path(candidate))
            opts = batch.CheckOptions(kwargs)
            return batch.run_command(batch.check_worker, plan, opts, jobs, "check", as_json, quiet)
        for label, value in (("ORIGINAL", original), ("CANDIDATE", candidate)):
            if Path(value).is_dir():
                raise InputError(f"{value}: {label} is a folder; give two model files or two folders")
        from lnfuse.batch import Spinner, progress_shown

        with Spinner(f"checking {candidate}", progress_shown(quiet)):
            result = check(original, candidate, **kwargs)
        if as_json:
            _emit_json(result.to_dict())
        else:
            click.echo(result.render_text())
        return 0 if result.ok else 1

    _run_guarded(ctx, debug, body)


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("model2", type=click.Path(dir_okay=False), required=False)
@click.option("--provider", type=_PROVIDER, default="auto", show_default=True, help="Execution provider.")
@click.option(
    "--level",
    type=click.Choice([*LEVELS, "both"], case_sensitive=False),
    default="both",
    show_default=True,
    help="ORT graph optimization level; 'both' = disable and all.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: ORT's)."
)
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Minimum timed runs.")
@click.option(
    "--min-time", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Minimum seconds."
)
@click.option(
    "--max-time",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Cap, seconds.",
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed warm-up runs."
)
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", help="Size of a symbolic dimension.")
@click.option("--seed", type=int, default=0, show_default=True, help="Input seed.")
@click.option("--no-spinning", is_flag=True, help="Disable ORT intra-op thread spinning.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no progress bar).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def bench_cmd(
    ctx: click.Context,
    model: str,
    model2: str | None,
    provider: str,
    level: str,
    threads: int | None,
    runs: int,
    min_time: float,
    max_time: float,
    warmup: int,
    dims: tuple[str, ...],
    seed: int,
    no_spinning: bool,
    as_json: bool,
    debug: bool,
) -> None:
    """Time MODEL (and MODEL2 head to head, alternating runs) on ONNX Runtime."""

    def body() -> int:
        from lnfuse.bench import bench

        result = bench(
            model,
            model2,
            provider=provider.lower(),
            levels=level.lower(),
            threads=threads,
            warmup=warmup,
            min_runs=runs,
            min_time=min_time,
            max_time=max_time,
            dims=parse_dims(dims),
            seed=seed,
            progress=False if as_json else None,
            spinning=False if no_spinning else None,
        )
        if as_json:
            _emit_json(result.to_dict())
        else:
            click.echo(result.render_text())
        return 0

    _run_guarded(ctx, debug, body)
