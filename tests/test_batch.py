"""Many models in one command: ``lnfuse optimize DIR -o OUTDIR -j 2`` and ``lnfuse check DIR1 DIR2``.

A folder of a dozen committed exported models (one of them saved with external data, two in a
subfolder) plus a truncated file: every good model is written, the truncated one gets its
one-line error and the batch exits 2; the summary table and the --json document say so; the
two folders then pass ``lnfuse check``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner

from lnfuse import batch
from lnfuse.cli import main
from models.recurrent import EXPORTED, OUT_DIR

SMALL = [
    "torch_layernorm_noaffine_opset14",
    "torch_layernorm_fp16_opset14",
    "torch_layernorm_opset16",
    "torch_layernorm_opset13",
    "torch_layernorm_opset11",
    "torch_f_layer_norm_opset12",
    "torch_layernorm_2d_opset14",
    "nested_loop_if_ln",
    "if_ln_both_branches",
    "ln_gru_scan",
    "ln_lstm_loop",
]
EXPECT = {c.name: c.expect_ln for c in EXPORTED}
EXTERNAL = "sub/transformer_block_opset14.onnx"  # saved with external data


def _invoke(*args: str) -> Any:
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart anyway
    return runner.invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "models"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(SMALL):
        shutil.copy(OUT_DIR / f"{name}.onnx", root / ("sub" if i >= 9 else "") / f"{name}.onnx")
    big = onnx.load(OUT_DIR / "transformer_block_opset14.onnx")
    onnx.save(big, root / EXTERNAL, save_as_external_data=True, location="tb.data", size_threshold=0)
    return root


@pytest.fixture(scope="module")
def optimized(zoo: Path) -> tuple[Path, Path, Any, Any]:
    """The zoo plus a truncated model, optimized to a folder as text and as --json."""
    with_bad = zoo.parent / "with_bad"
    shutil.copytree(zoo, with_bad)
    (with_bad / "truncated.onnx").write_bytes((OUT_DIR / "torch_layernorm_opset13.onnx").read_bytes()[:700])
    out = zoo.parent / "out"
    text = _invoke("optimize", str(with_bad), "-o", str(out), "-j", "2")
    as_json = _invoke("optimize", str(with_bad), "-o", str(zoo.parent / "out_json"), "-j", "2", "--json")
    return with_bad, out, text, as_json


def _rel(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_folder_with_a_truncated_model(optimized: tuple[Path, Path, Any, Any]) -> None:
    src, out, res, _ = optimized
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("lnfuse: error: ") and "truncated.onnx" in errors[0]
    good = [r for r in _rel(src) if r.endswith(".onnx") and r != "truncated.onnx"]
    assert len(good) == 12
    # every other model written at its relative path, external data beside it, nothing else
    assert _rel(out) == sorted([*good, f"{EXTERNAL}.data"])
    for rel in good:
        model = onnx.load(out / rel)
        onnx.checker.check_model(model, full_check=True)
        assert not any(n.op_type == "ReduceMean" for n in model.graph.node), rel
    assert os.path.getsize(out / f"{EXTERNAL}.data") > 100_000


def test_summary_table(optimized: tuple[Path, Path, Any, Any]) -> None:
    src, _, res, _ = optimized
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["model", "fused", "refused", "nodes", "seconds", "status"]
    assert lines[-1] == "13 models: 12 ok, 1 bad-input"
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert len(rows) == 13
    for rel in [*SMALL[:9], *("sub/" + n for n in SMALL[9:])]:
        row = rows[str(src / f"{rel}.onnx")]
        assert row[1] == str(EXPECT[rel.split("/")[-1]]) and row[-1] == "ok", row
    block = rows[str(src / EXTERNAL)]
    assert block[1:6] == ["3", "0", "91", "->", "61"] and block[-1] == "ok"
    assert rows[str(src / "truncated.onnx")][1:4] == ["-", "-", "-"]
    assert rows[str(src / "truncated.onnx")][-1] == "bad-input"


def test_json_document(optimized: tuple[Path, Path, Any, Any]) -> None:
    src, _, _, res = optimized
    assert res.exit_code == 2
    doc = json.loads(res.stdout)  # one document for the whole run
    assert doc["command"] == "optimize" and doc["jobs"] == 2 and doc["exit_code"] == 2
    assert doc["summary"] == {"ok": 12, "validation-failed": 0, "bad-input": 1, "internal-error": 0}
    by_name = {m["model"]: m for m in doc["models"]}
    bad = by_name[str(src / "truncated.onnx")]
    assert bad["status"] == "bad-input" and "truncated.onnx" in bad["error"] and bad["output"] is None
    block = by_name[str(src / EXTERNAL)]
    assert (block["fused"], block["refused"], block["nodes_before"], block["nodes_after"]) == (3, 0, 91, 61)
    assert block["report"]["fused"] == 3 and block["output"].endswith(EXTERNAL)
    assert all(m["status"] == "ok" and m["error"] is None for m in doc["models"] if m is not bad)


def test_check_over_two_folders(zoo: Path, optimized: tuple[Path, Path, Any, Any]) -> None:
    _, out, _, _ = optimized
    res = _invoke("check", str(zoo), str(out), "-j", "2")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "12 models: 12 ok"
    doc = json.loads(_invoke("check", str(zoo), str(out), "-j", "2", "--json", "--runs", "1").stdout)
    assert doc["exit_code"] == 0 and EXTERNAL in [m["model"] for m in doc["models"]]
    assert all(m["check"]["ok"] for m in doc["models"])


def test_several_files_and_an_output_folder(zoo: Path, tmp_path: Path) -> None:
    a, b = zoo / "torch_layernorm_opset11.onnx", zoo / "torch_layernorm_opset13.onnx"
    res = _invoke("optimize", str(a), str(b), "-o", str(tmp_path / "o"), "-j", "1", "--json")
    assert res.exit_code == 0, res.stderr
    assert _rel(tmp_path / "o") == ["torch_layernorm_opset11.onnx", "torch_layernorm_opset13.onnx"]
    clash = _invoke("optimize", str(a), str(a), "-o", str(tmp_path / "p"))
    assert clash.exit_code == 2 and "would both be written" in clash.stderr


def _crashing(job: batch.Job, opts: object) -> batch.Row:
    if job.name == "boom":
        os._exit(7)
    return batch.Row(job.name, batch.Status.OK)


def test_a_crashing_worker_fails_only_its_own_model(tmp_path: Path) -> None:
    jobs = [batch.Job(name, tmp_path / name) for name in ("a", "boom", "b")]
    rows = batch.run_jobs(_crashing, jobs, None, 2, "x", progress=False)
    assert [(r.name, r.status) for r in rows] == [
        ("a", batch.Status.OK),
        ("boom", batch.Status.ERROR),
        ("b", batch.Status.OK),
    ]
    assert "boom" in rows[1].error and "died" in rows[1].error
    assert batch.exit_code(rows) == 3


def test_default_jobs_is_capped(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = batch.plan_optimize([zoo], None)
    assert 1 <= batch.default_jobs(jobs) <= min(len(jobs), os.cpu_count() or 1)
    monkeypatch.setattr(batch, "_available_memory", lambda: 300 << 20)  # less than two workers need
    assert batch.default_jobs(jobs) == 1
    assert batch.estimated_need(zoo / EXTERNAL) > batch.estimated_need(zoo / "ln_gru_scan.onnx") + 200_000


def _bf16_model(path: Path) -> Path:
    """A fused-able norm plus a BFLOAT16 weight (which onnx-graphsurgeon warns about on stdout)."""
    from onnx import TensorProto, helper

    model = onnx.load(OUT_DIR / "torch_layernorm_2d_opset14.onnx")
    w = TensorProto(name="wbf", data_type=TensorProto.BFLOAT16, dims=[4], raw_data=bytes(8))
    model.graph.initializer.append(w)
    model.graph.node.append(helper.make_node("Cast", ["wbf"], ["wf"], to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("wf", TensorProto.FLOAT, [4]))
    onnx.save(model, path)
    return path


def test_nothing_unasked_on_stdout_or_stderr(tmp_path: Path) -> None:
    from onnx_graphsurgeon.logger import G_LOGGER

    before = G_LOGGER.severity
    src = _bf16_model(tmp_path / "bf16.onnx")
    res = _invoke("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--json", "--validate")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["fused"] == 1 and res.stderr == ""
    assert G_LOGGER.severity == before  # the CLI put it back
    text = _invoke("optimize", str(src), "-o", str(tmp_path / "p.onnx"))
    assert "[W]" not in text.stdout and text.stderr == ""


def test_spinner_draws_and_wipes(capsys: pytest.CaptureFixture[str]) -> None:
    import time

    with batch.Spinner("optimizing m.onnx", shown=True, after=0.0):
        time.sleep(0.2)
    err = capsys.readouterr().err
    assert "lnfuse: optimizing m.onnx ... 0s" in err and err.endswith("\r")
    with batch.Spinner("x", shown=False, after=0.0):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""
