"""Scale benchmark: optimize chains of 1,000 / 10,000 decomposed-LN blocks and a deep transformer.

::

    python benchmarks/bench_scale.py                  # chain 1000, chain 10000, transformer 48
    python benchmarks/bench_scale.py --quick          # chain 200, chain 2000, transformer 12
    python benchmarks/bench_scale.py --sizes 1000 --layers 0 --json
    python benchmarks/bench_scale.py --profile        # + cProfile of the largest chain (in-process)
    python benchmarks/bench_scale.py --strict         # exit 1 when a target is missed

For every model (built by :mod:`benchmarks.gen_chain`, saved to a temporary directory):

* **in-process** (a fresh child Python, so each peak RSS is that model's own): load, graph import,
  match + rewrite (the pass), export, output check, from ``result.report.timings``; the pass is split
  further into walk (candidate search), check, proof, rewrite and commit by timing wrappers installed in
  the child only (columns left empty when the core is refactored and a hook is gone); then the save
  (``lnfuse.io.save_model``). ``rss`` is the child's peak resident set size.
* **end to end**: wall time from process start to output file written of the real command line,
  ``python -m lnfuse optimize model.onnx -o out.onnx`` (when ``lnfuse/__main__.py`` does not exist,
  the API one-liner ``python -c "import lnfuse, onnx; r = lnfuse.optimize(...); onnx.save(...)"``;
  the ``e2e via`` line says which), and that process's peak RSS (``os.wait4``). The output is then
  loaded and its ``LayerNormalization`` count compared with the number of generated LNs.

Targets (2-core machine): the 10,000-block chain (110k nodes) end to end < 10 s, and the
10,000-block time at most 11x the 1,000-block time (issue #12; printed for end-to-end and in-process
optimize).
A wrong fused count always exits 1; missed timing targets exit 1 only with ``--strict``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

E2E_TARGET_S = 10.0
FLOOR_TIME_TARGET = 1.5  # issue #12: end to end at most 1.5x the load + save floor's time
FLOOR_MEM_TARGET = 2.0  # ... and 2x its peak memory
RATIO_TARGET = 11.0  # issue #12: 10x the nodes in at most 11x the time (an earlier issue allowed 12x)

# --------------------------------------------------------------------------------------------------
# child: one in-process measurement


@contextlib.contextmanager
def _phase_hooks(acc: dict[str, float]) -> Iterator[None]:
    """Accumulate wall time spent in the rule's pattern/check/rewrite, proofs and commits."""
    patched: list[tuple[object, str, object]] = []

    def wrap(owner: object, attr: str, key: str, generator: bool = False) -> None:
        orig = getattr(owner, attr, None)
        if orig is None:
            return

        if generator:

            def timed_gen(*a: object, **k: object) -> Iterator[object]:
                it = orig(*a, **k)
                while True:
                    t = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
                        return
                    acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
                    yield item

            setattr(owner, attr, timed_gen)
        else:

            def timed(*a: object, **k: object) -> object:
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

            setattr(owner, attr, timed)
        patched.append((owner, attr, orig))

    try:
        from lnfuse import graph, rules, verify

        wrap(rules.NormRule, "pattern", "walk", generator=True)
        wrap(rules.NormRule, "check", "check")
        wrap(rules.NormRule, "rewrite", "rewrite")
        wrap(verify.Prover, "prove", "prove")
        wrap(graph.ModelGraph, "commit", "commit")
    except ImportError:
        pass
    try:
        yield
    finally:
        for owner, attr, orig in reversed(patched):
            setattr(owner, attr, orig)


def _count_ln(path: str) -> int:
    import onnx

    m = onnx.load(path)
    return sum(1 for n in m.graph.node if n.op_type == "LayerNormalization")


def _own_peak_mib() -> float:
    """This process's peak RSS: ``VmHWM`` where Linux has it (the peak of this address space;
    ``ru_maxrss`` of a child started straight from the benchmark keeps the benchmark's own peak
    from before exec), else ``ru_maxrss``."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(src: str, out: str) -> dict[str, object]:
    """Optimize ``src`` in this process, save to ``out``; timings (s) and peak RSS (MiB)."""
    t_start = time.perf_counter()
    import onnx  # noqa: F401  (import cost reported separately)

    import lnfuse
    from lnfuse import io as lio

    t_import = time.perf_counter()
    phases: dict[str, float] = {}
    with _phase_hooks(phases):
        t0 = time.perf_counter()
        result = lnfuse.optimize(src)
        t1 = time.perf_counter()
    lio.save_model(result.model, out)
    t2 = time.perf_counter()
    tm = result.report.timings
    rec: dict[str, object] = {
        "py_import": t_import - t_start,
        "load": tm.get("load"),
        "import": tm.get("import_"),
        "pass": tm.get("match"),
        "export": tm.get("export"),
        "check": tm.get("check"),
        "optimize": t1 - t0,
        "save": t2 - t1,
        "total": t2 - t_start,
        "fused": len(result.report.matches),
        "refused": len(result.report.refusals),
        "proofs": result.report.proofs_run,
        "nodes_before": result.report.nodes_before,
        "nodes_after": result.report.nodes_after,
        "rss_mib": _own_peak_mib(),
    }
    rec.update({f"phase_{k}": v for k, v in phases.items()})
    return rec


# --------------------------------------------------------------------------------------------------
# parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# Runs argv[1:] as a child of this small process and prints its wall time and peak RSS. A child
# forked straight from the benchmark would report at least the benchmark's own RSS: Linux keeps
# the peak of the address space a process had before exec.
_LAUNCHER = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.spawnv(os.P_NOWAIT, sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f'\\n@@launcher {time.perf_counter() - t} {usage.ru_maxrss} "
    "{os.waitstatus_to_exitcode(status)}\\n')\n"
)


def _run_wait4(cmd: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """Run ``cmd`` (through the launcher); (wall s, peak RSS MiB, returncode, stderr tail)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd], cwd=cwd, env=_env(), capture_output=True, check=False
    )
    err = proc.stderr.decode(errors="replace")
    head, _, last = err.rpartition("@@launcher ")
    wall, rss_kib, rc = last.split()
    return float(wall), int(rss_kib) / 1024.0, int(rc), head[-2000:]


def e2e_command(src: Path, out: Path, form: str) -> tuple[list[str], str]:
    """The end-to-end command line and a label: the CLI when it exists (``form='auto'``)."""
    has_cli = importlib.util.find_spec("lnfuse.__main__") is not None
    if form == "cli" or (form == "auto" and has_cli):
        return [
            sys.executable,
            "-m",
            "lnfuse",
            "optimize",
            str(src),
            "-o",
            str(out),
        ], "python -m lnfuse optimize"
    code = f"import lnfuse, onnx; r = lnfuse.optimize({str(src)!r}); onnx.save(r.model, {str(out)!r})"
    return [sys.executable, "-c", code], "python -c 'lnfuse.optimize + onnx.save' (no lnfuse/__main__.py yet)"


def floor_command(src: Path, out: Path) -> list[str]:
    """What any tool must at least do: start Python, ``onnx.load`` the model, ``onnx.save`` it."""
    code = f"import onnx; m = onnx.load({str(src)!r}); onnx.save(m, {str(out)!r})"
    return [sys.executable, "-c", code]


def checked_floor_command(src: Path, fused: Path, out: Path) -> list[str]:
    """The floor plus the two checks lnfuse promises: ``onnx.checker`` on the input, then (the input
    dropped) the full check with shape inference on lnfuse's output ``fused``, which is saved. What
    lnfuse costs at least while it keeps those promises (with no matching and no graph layer)."""
    code = (
        f"import onnx; m = onnx.load({str(src)!r}); onnx.checker.check_model(m); del m; "
        f"f = onnx.load({str(fused)!r}); onnx.checker.check_model(f, full_check=True); onnx.save(f, {str(out)!r})"
    )
    return [sys.executable, "-c", code]


def calibrate() -> float:
    """Seconds for a fixed pure-Python loop (10M additions): how fast this CPU is right now.

    Shared cloud cores here vary by about +-30% from minute to minute; each end-to-end run is
    printed next to the calibration taken just before it, so figures from different times can
    be compared (0.3-0.5 s on this 2-core machine).
    """
    t = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t


def measure(
    name: str, build: Callable[[], object], workdir: Path, form: str, repeat: int
) -> dict[str, object]:
    import onnx

    t = time.perf_counter()
    gen = build()
    src = workdir / f"{name}.onnx"
    onnx.save(gen.model, src)  # type: ignore[attr-defined]
    gen_s = time.perf_counter() - t
    n_nodes = len(gen.model.graph.node)  # type: ignore[attr-defined]
    expected = gen.expected_ln  # type: ignore[attr-defined]
    del gen

    rec: dict[str, object] = {"model": name, "nodes": n_nodes, "expected_ln": expected, "generate": gen_s}
    rec["file_mib"] = src.stat().st_size / 2**20

    # In-process breakdown (best of `repeat` by optimize time).
    best: dict[str, object] | None = None
    for _ in range(repeat):
        out = workdir / f"{name}.inproc.onnx"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(out)]
        proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: in-process child failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if best is None or r["optimize"] < best["optimize"]:  # type: ignore[operator]
            best = r
    assert best is not None
    rec.update(best)
    fused = out  # the in-process run's output, for the checked floor

    # End to end (best of `repeat`), each run right after the load + save floor on the same file.
    out = workdir / f"{name}.e2e.onnx"
    walls, rsss, calib, floor_walls, floor_rsss, ck_walls, ck_rsss = [], [], [], [], [], [], []
    label = ""
    for _ in range(repeat):
        if out.exists():
            out.unlink()
        calib.append(calibrate())
        wall, rss, rc, err = _run_wait4(floor_command(src, workdir / f"{name}.floor.onnx"), workdir)
        if rc != 0:
            raise RuntimeError(f"{name}: load + save floor failed (rc {rc}):\n{err}")
        floor_walls.append(wall)
        floor_rsss.append(rss)
        wall, rss, rc, err = _run_wait4(
            checked_floor_command(src, fused, workdir / f"{name}.ck.onnx"), workdir
        )
        if rc != 0:
            raise RuntimeError(f"{name}: checked floor failed (rc {rc}):\n{err}")
        ck_walls.append(wall)
        ck_rsss.append(rss)
        cmd, label = e2e_command(src, out, form)
        wall, rss, rc, err = _run_wait4(cmd, workdir)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"{name}: end-to-end command failed (rc {rc}):\n{err}")
        walls.append(wall)
        rsss.append(rss)
    rec["e2e"] = min(walls)
    rec["e2e_runs"] = walls
    rec["calib_runs"] = calib
    rec["e2e_rss_mib"] = min(rsss)
    rec["floor"] = min(floor_walls)
    rec["floor_rss_mib"] = min(floor_rsss)
    rec["x_floor"] = rec["e2e"] / rec["floor"]
    rec["x_floor_mem"] = rec["e2e_rss_mib"] / rec["floor_rss_mib"]
    rec["ck_floor"] = min(ck_walls)
    rec["ck_floor_rss_mib"] = min(ck_rsss)
    rec["e2e_via"] = label
    rec["out_ln"] = _count_ln(str(out))
    return rec


def _fmt(v: object, width: int, prec: int = 2) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:.{prec}f}".rjust(width)
    return str(v).rjust(width)


COLUMNS = [
    ("model", "model", 14),
    ("nodes", "nodes", 7),
    ("fused", "LN", 6),
    ("load", "load", 6),
    ("import", "import", 7),
    ("phase_walk", "walk", 6),
    ("phase_check", "check", 6),
    ("phase_prove", "prove", 6),
    ("phase_rewrite", "rewrt", 6),
    ("phase_commit", "commit", 7),
    ("pass", "pass", 6),
    ("export", "export", 7),
    ("check", "chkr", 6),
    ("optimize", "optim", 6),
    ("save", "save", 6),
    ("total", "child", 6),
    ("rss_mib", "rssMiB", 7),
    ("e2e", "e2e", 6),
    ("e2e_rss_mib", "e2eMiB", 7),
    ("floor", "floor", 6),
    ("floor_rss_mib", "flMiB", 6),
    ("x_floor", "xtime", 6),
    ("x_floor_mem", "xmem", 5),
    ("ck_floor", "ckfl", 6),
    ("ck_floor_rss_mib", "ckMiB", 6),
]


def print_table(records: list[dict[str, object]]) -> None:
    print("times in seconds; 'pass' = match + rewrite (walk/check/prove/rewrite/commit are parts of it);")
    print("'optim' = lnfuse.optimize(path) in-process; 'child' = in-process total incl. imports and save;")
    print("'e2e' = process start to file written (best run); RSS = peak resident set size;")
    print(
        "'floor' = a process that only runs onnx.load + onnx.save on the same file, just before each e2e run;"
    )
    print(
        f"'xtime' / 'xmem' = e2e over the floor (targets: <= {FLOOR_TIME_TARGET}x time, <= {FLOOR_MEM_TARGET}x memory)"
    )
    print(
        "'ckfl' / 'ckMiB' = the floor plus onnx.checker on the input and the full check on lnfuse's output "
        "(the checks lnfuse runs), no matching"
    )
    print(" ".join(h.rjust(w) if k != "model" else h.ljust(w) for k, h, w in COLUMNS))
    for r in records:
        cells = []
        for k, _h, w in COLUMNS:
            v = r.get(k)
            cells.append(str(v).ljust(w) if k == "model" else _fmt(v, w, 0 if k.endswith("mib") else 2))
        print(" ".join(cells))


def profile_inprocess(src: Path, top: int) -> str:
    """cProfile of ``lnfuse.optimize(src)`` + save, top entries by cumulative and by total time."""
    import lnfuse
    from lnfuse import io as lio

    prof = cProfile.Profile()
    prof.enable()
    result = lnfuse.optimize(str(src))
    lio.save_model(result.model, str(src.with_suffix(".prof.onnx")))
    prof.disable()
    buf = io.StringIO()
    for key in ("cumulative", "tottime"):
        buf.write(f"\n--- cProfile of optimize + save on {src.name}, sorted by {key} ---\n")
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lnfuse scale benchmark (see module docstring)")
    ap.add_argument(
        "--sizes", type=int, nargs="*", default=None, help="chain lengths in blocks (default 1000 10000)"
    )
    ap.add_argument("--layers", type=int, default=None, help="transformer layers (default 48; 0 = skip)")
    ap.add_argument("--quick", action="store_true", help="chain 200 and 2000, transformer 12")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (best is reported)")
    ap.add_argument("--e2e-form", choices=["auto", "cli", "api"], default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp dir)")
    ap.add_argument("--profile", action="store_true", help="also cProfile the largest chain in-process")
    ap.add_argument("--top", type=int, default=25, help="profile lines to print")
    ap.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a timing target is missed")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from benchmarks.gen_chain import build_chain, build_transformer

    sizes = args.sizes if args.sizes is not None else ([200, 2000] if args.quick else [1000, 10000])
    layers = args.layers if args.layers is not None else (12 if args.quick else 48)
    ctx = (
        contextlib.nullcontext(args.workdir)
        if args.workdir
        else tempfile.TemporaryDirectory(prefix="lnfuse_scale_")
    )
    records: list[dict[str, object]] = []
    with ctx as wd:
        workdir = Path(wd)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            print(f"[bench_scale] chain {n} ...", file=sys.stderr, flush=True)
            records.append(
                measure(f"chain_{n}", lambda n=n: build_chain(n), workdir, args.e2e_form, args.repeat)
            )
        if layers:
            print(f"[bench_scale] transformer {layers} ...", file=sys.stderr, flush=True)
            records.append(
                measure(
                    f"transformer_{layers}",
                    lambda: build_transformer(layers),
                    workdir,
                    args.e2e_form,
                    args.repeat,
                )
            )
        prof_text = (
            profile_inprocess(workdir / f"chain_{max(sizes)}.onnx", args.top)
            if args.profile and sizes
            else ""
        )

    wrong = [r for r in records if r["fused"] != r["expected_ln"] or r["out_ln"] != r["expected_ln"]]
    chains = sorted(
        (r for r in records if str(r["model"]).startswith("chain_")), key=lambda r: int(r["nodes"])
    )
    summary: dict[str, object] = {}
    if len(chains) >= 2:
        small, big = chains[0], chains[-1]
        summary["ratio_e2e"] = float(big["e2e"]) / float(small["e2e"])  # type: ignore[arg-type]
        summary["ratio_optimize"] = float(big["optimize"]) / float(small["optimize"])  # type: ignore[arg-type]
        summary["ratio_blocks"] = int(big["expected_ln"]) / int(small["expected_ln"])  # type: ignore[arg-type]
        summary["ratio_of"] = f"{big['model']} / {small['model']}"
    big10k = next((r for r in records if r["model"] == "chain_10000"), None)

    if args.json:
        print(json.dumps({"records": records, "summary": summary}, indent=2))
    else:
        print_table(records)
        print(f"e2e via: {records[0]['e2e_via'] if records else '-'}")
        if summary:
            print(
                f"ratio {summary['ratio_of']} ({summary['ratio_blocks']:.0f}x the blocks): "
                f"e2e {summary['ratio_e2e']:.2f}x, in-process optimize {summary['ratio_optimize']:.2f}x "
                f"(target <= {RATIO_TARGET:.0f}x)"
            )
        for r in records:
            runs = ", ".join(
                f"{w:.2f} s (cpu check {c:.2f} s)"
                for w, c in zip(r["e2e_runs"], r["calib_runs"], strict=False)  # type: ignore[call-overload]
            )
            print(f"{r['model']} end-to-end runs: {runs}")
        if big10k is not None:
            verdict = "PASS" if float(big10k["e2e"]) < E2E_TARGET_S else "FAIL"  # type: ignore[arg-type]
            print(
                f"chain_10000 end to end: {float(big10k['e2e']):.2f} s (target < {E2E_TARGET_S:.0f} s): {verdict}"
            )  # type: ignore[arg-type]
        if big10k is not None:
            xt, xm = float(big10k["x_floor"]), float(big10k["x_floor_mem"])  # type: ignore[arg-type]
            print(
                f"chain_10000 against the load + save floor ({float(big10k['floor']):.2f} s, "  # type: ignore[arg-type]
                f"{float(big10k['floor_rss_mib']):.0f} MiB): {xt:.2f}x time (target <= {FLOOR_TIME_TARGET}x): "  # type: ignore[arg-type]
                f"{'PASS' if xt <= FLOOR_TIME_TARGET else 'MISS'}, {xm:.2f}x memory (target <= {FLOOR_MEM_TARGET}x): "
                f"{'PASS' if xm <= FLOOR_MEM_TARGET else 'MISS'}"
            )
            ck, ckm = float(big10k["ck_floor"]), float(big10k["ck_floor_rss_mib"])  # type: ignore[arg-type]
            print(
                f"chain_10000: the two checks alone with load + save: {ck:.2f} s, {ckm:.0f} MiB = "
                f"{ck / float(big10k['floor']):.2f}x time, {ckm / float(big10k['floor_rss_mib']):.2f}x memory "  # type: ignore[arg-type]
                "of the floor"
            )
        print(
            "cpu check = a fixed 10M-iteration Python loop timed just before each run "
            "(0.3-0.5 s seen on this 2-core machine; larger means a slower moment)"
        )
        for r in wrong:
            print(
                f"WRONG COUNT {r['model']}: generated {r['expected_ln']}, fused {r['fused']}, output has {r['out_ln']}"
            )
        if prof_text:
            print(prof_text)
    if wrong:
        return 1
    missed = (big10k is not None and float(big10k["e2e"]) >= E2E_TARGET_S) or (  # type: ignore[arg-type]
        summary.get("ratio_blocks") == 10 and float(summary["ratio_e2e"]) > RATIO_TARGET  # type: ignore[arg-type]
    )
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
