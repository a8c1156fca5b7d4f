"""A > 2 GB model with external data through ``lnfuse optimize``: time, peak memory, byte-exact weights.

    python benchmarks/bench_large.py [--gb 2.2] [--keep DIR]

Builds a transformer-like model whose weights total ``--gb`` gigabytes (one large MatMul weight
between two decomposed LayerNorms), saves it with external data, runs the real CLI
(``python -m lnfuse optimize big.onnx -o out/big.ln.onnx``) as a subprocess and prints the wall
time, the child's peak RSS (as a multiple of the weight size: the CLI never reads the external
weights, so it should stay far below one copy), and whether every initializer untouched by the rewrite kept its exact bytes
(compared by SHA-256, streamed). Needs about 3x ``--gb`` of free disk. Not a unit test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gen_chain import ln_nodes


def _ln(x: str, out: str, p: str, h: int, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The torch.onnx LayerNorm chain (from gen_chain) with its own gamma/beta/eps, ending in ``out``."""
    rng = np.random.default_rng(len(p))
    inits += [
        numpy_helper.from_array(rng.normal(1, 0.1, h).astype(np.float32), f"{p}gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, h).astype(np.float32), f"{p}beta"),
        numpy_helper.from_array(np.array(2.0, np.float32), f"{p}two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), f"{p}eps"),
    ]
    nodes: list[onnx.NodeProto] = []
    last = ln_nodes(nodes, x, p, f"{p}gamma", f"{p}beta", f"{p}two", f"{p}eps")
    nodes.append(helper.make_node("Identity", [last], [out]))
    return nodes


def build(path: Path, gb: float) -> int:
    h = 1024
    # Several weights of <= 1 GiB each: one protobuf message cannot hold 2 GiB.
    n_weights = max(1, int(np.ceil(gb)))
    n_out = max(h, int(gb * (1 << 30) / 4 / h / n_weights))
    inits: list[onnx.TensorProto] = []
    nodes = _ln("x", "ln1", "a_", h, inits)
    prev = "ln1"
    for i in range(n_weights):
        w = np.ones((h, n_out), dtype=np.float32)
        w[0, :] = np.arange(n_out, dtype=np.float32) * 1e-7 * (i + 1)
        inits.append(numpy_helper.from_array(w, f"big_weight_{i}"))
        del w
        nodes.append(helper.make_node("MatMul", ["ln1", f"big_weight_{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("ReduceMean", [f"mm{i}"], [f"r{i}"], axes=[-1], keepdims=1))
        nodes.append(helper.make_node("Add", [prev, f"r{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["h_last"]))
    nodes += _ln("h_last", "y", "b_", h, inits)
    g = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", h])],
        initializer=inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )
    return h * n_out * 4 * n_weights


def tensor_digests(model_path: Path) -> dict[str, str]:
    m = onnx.load(model_path, load_external_data=False)
    out: dict[str, str] = {}
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if "location" not in info:
            out[t.name] = hashlib.sha256(t.raw_data).hexdigest()
            continue
        h = hashlib.sha256()
        with open(model_path.parent / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            remaining = int(info["length"])
            while remaining:
                chunk = f.read(min(remaining, 1 << 24))
                h.update(chunk)
                remaining -= len(chunk)
        out[t.name] = h.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only is not None:
        print(build(args.build_only, args.gb))
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="lnfuse-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "big.onnx"
        t0 = time.perf_counter()
        # Built by a child process: a child forked later from a parent that still held the
        # generated weights would start with (and report as its peak) the parent's memory.
        built = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--build-only", str(src), "--gb", str(args.gb)],
            capture_output=True,
            text=True,
            check=True,
        )
        nbytes = int(built.stdout.split()[-1])
        print(f"built {src} with {nbytes / 2**30:.2f} GiB of weights in {time.perf_counter() - t0:.1f} s")
        before = tensor_digests(src)
        (work / "out").mkdir(exist_ok=True)
        out = work / "out" / "big.ln.onnx"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lnfuse", "optimize", str(src), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - t0
        peak = usage.ru_maxrss * 1024
        print(stdout.decode(errors="replace").rstrip())
        if os.waitstatus_to_exitcode(status) != 0:
            print(stderr.decode(errors="replace"), file=sys.stderr)
            return 1
        after = tensor_digests(out)
        kept = [n for n in before if n in after]
        same = all(before[n] == after[n] for n in kept)
        print(f"optimize wall time: {wall:.1f} s")
        print(f"peak RSS of the lnfuse process: {peak / 2**30:.2f} GiB = {peak / nbytes:.2f}x the weights")
        print(f"output files: {sorted(p.name for p in out.parent.iterdir())}")
        print(f"initializers kept: {len(kept)}/{len(before)}, byte-identical: {same}")
        print(f"input untouched: {tensor_digests(src) == before}")
        return 0 if same else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
