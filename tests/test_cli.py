"""The ``lnfuse`` command line: optimize, passes, output paths, JSON, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from lnfuse.cli import main
from lnfuse.io import file_digest
from models import patterns

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "exported" / "transformer_block_opset14.onnx"


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "model.onnx"
    onnx.save(patterns.ALL["torch_opset14"].build(), p)
    return p


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_optimize_with_output(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.ln.onnx"
    digest = file_digest(model_path)
    res = invoke("optimize", str(model_path), "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "fused 1 LayerNormalization" in res.output
    assert "opset: 14 -> 17" in res.output
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["LayerNormalization"]
    assert file_digest(model_path) == digest


def test_optimize_default_output_next_to_input(model_path: Path) -> None:
    res = invoke("optimize", str(model_path))
    assert res.exit_code == 0, res.output
    assert (model_path.parent / "model.ln.onnx").exists()


def test_refuses_to_overwrite_input_without_flag(model_path: Path) -> None:
    digest = file_digest(model_path)
    res = invoke("optimize", str(model_path), "-o", str(model_path))
    assert res.exit_code == 2
    assert "in-place" in res.output
    assert file_digest(model_path) == digest
    res = invoke("optimize", str(model_path), "-o", str(model_path), "--in-place")
    assert res.exit_code == 0
    assert [n.op_type for n in onnx.load(model_path).graph.node] == ["LayerNormalization"]


def test_json_report(model_path: Path, tmp_path: Path) -> None:
    res = invoke("optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--json")
    assert res.exit_code == 0
    d = json.loads(res.output)
    assert d["fused"] == 1 and d["by_pattern"] == {"pytorch": 1}
    assert d["opset_before"] == 14 and d["opset_after"] == 17
    assert d["output"].endswith("o.onnx")


def test_explain_lists_refusals(tmp_path: Path) -> None:
    p = tmp_path / "neg.onnx"
    onnx.save(patterns.ALL["neg_sub_reversed"].build(), p)
    res = invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx"), "--explain")
    assert res.exit_code == 0
    assert "fused 0 LayerNormalization" in res.output
    assert "mean - x" in res.output


def test_validate_and_run_twice_is_noop(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    res = invoke("optimize", str(model_path), "-o", str(out), "--validate")
    assert res.exit_code == 0, res.output
    assert "validation: equal" in res.output
    out2 = tmp_path / "o2.onnx"
    res = invoke("optimize", str(out), "-o", str(out2), "--json")
    d = json.loads(res.output)
    assert d["fused"] == 0 and d["changed"] is False


@pytest.mark.parametrize(
    "content",
    [b"", b"not an onnx model at all\n", b"\x08\x07\x12\x04junk"],
    ids=["empty", "text", "junk"],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    out = tmp_path / "out.onnx"
    res = invoke("optimize", str(p), "-o", str(out))
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lnfuse: error:")
    assert "Traceback" not in res.output
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.onnx"]


def test_missing_file(tmp_path: Path) -> None:
    res = invoke("optimize", str(tmp_path / "nope.onnx"))
    assert res.exit_code == 2
    assert "nope.onnx" in res.output


def test_truncated_model(model_path: Path, tmp_path: Path) -> None:
    data = onnx.load(SAMPLE).SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    res = invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx"))
    assert res.exit_code == 2
    assert not (tmp_path / "o.onnx").exists()


def test_passes_lists_registered_passes() -> None:
    res = invoke("passes")
    assert res.exit_code == 0
    assert "layer-norm" in res.output and "rms-norm" in res.output


def test_python_dash_m_and_readme_example(tmp_path: Path) -> None:
    out = tmp_path / "block.ln.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "lnfuse", "optimize", str(SAMPLE), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fused 3 LayerNormalization" in proc.stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)


def _dash_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lnfuse", *args], capture_output=True, text=True, check=False
    )


def test_entry_point_keeps_exit_codes_and_flushes_output(tmp_path: Path) -> None:
    """``lnfuse.cli.run`` leaves with os._exit: exit codes and buffered output must survive it."""
    ok = _dash_m("optimize", str(SAMPLE), "-o", str(tmp_path / "o.onnx"), "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)  # the whole document arrived (a lost buffer would cut it)
    assert len(report["matches"]) == 3
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"not a model")
    res = _dash_m("optimize", str(bad), "-o", str(tmp_path / "x.onnx"))
    assert res.returncode == 2
    assert res.stderr.startswith("lnfuse: error:") and str(bad) in res.stderr
    assert not (tmp_path / "x.onnx").exists()
    usage = _dash_m("optimize")  # click's own usage error
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
    helped = _dash_m("--help")
    assert helped.returncode == 0 and "optimize" in helped.stdout
    same = _dash_m("check", str(SAMPLE), str(SAMPLE), "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["ok"] is True


def test_unsupported_opset(tmp_path: Path) -> None:
    m = patterns.ALL["torch_opset14"].build()
    m.opset_import[0].version = 99
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    res = invoke("optimize", str(p), "-o", str(tmp_path / "o.onnx"))
    assert res.exit_code == 2
    assert "opset" in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_check_command_gates_a_broken_candidate(model_path: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    assert invoke("optimize", str(model_path), "-o", str(good)).exit_code == 0
    m = onnx.load(good)
    for a in m.graph.node[0].attribute:
        if a.name == "epsilon":
            a.f = 10.0
    bad = tmp_path / "bad.onnx"
    onnx.save(m, bad)
    assert invoke("check", str(model_path), str(good)).exit_code == 0
    res = invoke("check", str(model_path), str(bad))
    assert res.exit_code == 1
    assert "y" in res.output
