"""The ``lnfuse`` command line: a thin layer over :mod:`lnfuse.api`.

Commands: ``optimize`` (fuse, optionally ``--validate`` / ``--bench``), ``check``
(numeric equivalence gate), ``bench`` (latency side by side) and ``passes``.
Errors print one line (``lnfuse: error: ...``) and exit non-zero: 2 for bad
input, 1 for a failed numeric check; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from lnfuse.cli_runtime import bench_cmd, check_cmd, parse_dims, parse_ranges
from lnfuse.errors import LnfuseError

_PROVIDER = click.Choice(["auto", "cuda", "cpu"], case_sensitive=False)
_LEVEL = click.Choice(["disable", "basic", "extended", "all"], case_sensitive=False)


def run(prog_name: str = "lnfuse") -> None:
    """Console entry point: :func:`main`, then a fast exit once output is flushed.

    A command process holds at most one model graph, all reference cycles. Collecting and
    freeing it at interpreter exit costs about as much as importing it (~0.7 s on 110k nodes)
    and does nothing useful, so the process runs without the cyclic GC and leaves with
    ``os._exit`` after flushing stdout and stderr. Every file was already closed (outputs are
    fsynced and renamed into place before the command returns). Tests drive :func:`main`.
    """
    import gc

    gc.disable()
    code: int = 0
    try:
        main(prog_name=prog_name)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                code = code or 1
    os._exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lnfuse")
def main() -> None:
    """Fuse decomposed LayerNorm (and RMSNorm) in ONNX models, and prove the result equal."""


@main.command("optimize")
@click.argument("models", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output path (default: MODEL.ln.onnx next to MODEL); with several models or a folder, "
    "an output folder (outputs keep their paths relative to the folder given).",
)
@click.option("--in-place", is_flag=True, help="Allow the output to overwrite the input.")
@click.option(
    "--explain", is_flag=True, help="List every fusion and every refused candidate with its reason."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option(
    "--rmsnorm",
    is_flag=True,
    help="Also fuse RMSNorm into RMSNormalization (raises the opset to 23 when exact).",
)
@click.option("--no-verify", is_flag=True, help="Skip the per-match numeric proof.")
@click.option(
    "--no-hoist", is_flag=True, help="Do not hoist input-side LNs of unrolled RNNs across time steps."
)
@click.option(
    "--no-transpose", is_flag=True, help="Do not fuse norms over non-trailing axes (which needs Transposes)."
)
@click.option(
    "--target-opset",
    type=int,
    default=None,
    help="Raise the default-domain opset to at least this (exactly, or fail).",
)
@click.option(
    "--validate",
    is_flag=True,
    help="Check the result against the original on ONNX Runtime before writing it.",
)
@click.option(
    "--bench",
    "do_bench",
    is_flag=True,
    help="Also time original vs result (implies nothing is written if --validate fails).",
)
@click.option(
    "--provider", type=_PROVIDER, default="auto", show_default=True, help="Provider for --validate/--bench."
)
@click.option(
    "--level",
    type=_LEVEL,
    default="disable",
    show_default=True,
    help="ORT optimization level for --validate.",
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=VALUE",
    help="Symbolic dimension size for --validate/--bench.",
)
@click.option(
    "--input-range", "ranges", multiple=True, metavar="NAME=LO:HI", help="Value range of an integer input."
)
@click.option(
    "--allow-fixed-overflow",
    is_flag=True,
    help="In --validate, accept outputs where only the original overflowed.",
)
@click.option("--allow-invalid", is_flag=True, help="Optimize a model even if it fails onnx.checker.")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes for several models (default: one per core, capped by memory).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress indication on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def optimize_cmd(
    ctx: click.Context,
    models: tuple[Path, ...],
    output: Path | None,
    in_place: bool,
    explain: bool,
    as_json: bool,
    rmsnorm: bool,
    no_verify: bool,
    no_hoist: bool,
    no_transpose: bool,
    target_opset: int | None,
    validate: bool,
    do_bench: bool,
    provider: str,
    level: str,
    dims: tuple[str, ...],
    ranges: tuple[str, ...],
    allow_fixed_overflow: bool,
    allow_invalid: bool,
    jobs: int | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Fuse every decomposed norm in MODEL (several models, or folders of *.onnx) and write the result."""

    def body() -> int:
        from lnfuse import batch

        opts = batch.OptimizeOptions(
            rmsnorm=rmsnorm,
            hoist=not no_hoist,
            verify=not no_verify,
            allow_transpose=not no_transpose,
            target_opset=target_opset,
            allow_invalid=allow_invalid,
            validate=validate,
            bench=do_bench,
            provider=provider,
            level=level,
            dims=parse_dims(dims),
            ranges=parse_ranges(ranges),
            allow_fixed_overflow=allow_fixed_overflow,
            in_place=in_place,
            bench_progress=False if as_json else None,
        )
        if len(models) > 1 or models[0].is_dir():
            plan = batch.plan_optimize(models, output)
            return batch.run_command(batch.optimize_worker, plan, opts, jobs, "optimize", as_json, quiet)
        (model,) = models
        shown = batch.progress_shown(quiet) and not do_bench  # --bench draws its own progress
        with batch.Spinner(f"optimizing {model}", shown):
            out = batch.optimize_file(model, output, opts)
        if out.failure_text and not as_json:
            click.echo(out.failure_text, err=True)
        report = out.report
        _emit(report, as_json, explain, out.written)
        if out.code != 0:
            failing = (
                [o.get("name") for o in (report.validation or {}).get("failures", [])]
                if report.validation
                else []
            )
            click.echo(
                f"lnfuse: error: validation failed{(' for ' + ', '.join(map(str, failing))) if failing else ''}; nothing written",
                err=True,
            )
        return out.code

    _guard(ctx, debug, body)


def _emit(report: Any, as_json: bool, explain: bool, written: Path | None) -> None:
    if as_json:
        d = report.to_dict()
        d["output"] = os.fspath(written) if written else None
        click.echo(json.dumps(d, indent=2, default=str))
        return
    click.echo(report.render_text(explain=explain))
    if report.benchmark:
        for lvl in report.benchmark.get("levels", []):
            ratio = lvl.get("ratio_median")
            if ratio:
                click.echo(f"  bench [{lvl.get('level')}]: fused is {ratio:.2f}x the speed of the original")
    if written is not None:
        click.echo(f"  wrote {written}")


@main.command("passes")
def passes_cmd() -> None:
    """List the registered rewrite passes, in the order they run."""
    from lnfuse.passes import DEFAULT_PASSES

    for cls in DEFAULT_PASSES:
        p = cls()
        click.echo(f"{p.name:12s} {p.description}")


def _guard(ctx: click.Context, debug: bool, body: Any) -> None:
    try:
        code = body()
    except LnfuseError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"lnfuse: error: {err}", err=True)
        ctx.exit(err.exit_code)
        return
    except KeyboardInterrupt:
        click.echo("lnfuse: interrupted", err=True)
        ctx.exit(130)
        return
    except Exception as err:  # a bug: say so in one line, traceback only on request
        if debug:
            traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        click.echo(f"lnfuse: internal error: {type(err).__name__}: {first} (rerun with --debug)", err=True)
        ctx.exit(3)
        return
    ctx.exit(code)


main.add_command(check_cmd)
main.add_command(bench_cmd)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
