"""Tests for lnfuse.bench and the ``bench`` CLI command (no assertions on speed)."""

from __future__ import annotations

import importlib
import io
import json

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lnfuse.bench import BenchResult, LevelResult, Timing, bench
from lnfuse.cli_runtime import bench_cmd
from lnfuse.errors import InputError
from lnfuse.runtime import ProviderChoice

# ``lnfuse.bench`` may be re-exported as the function by lnfuse/__init__.py: get the module.
bench_mod = importlib.import_module("lnfuse.bench")

H = 16
FAST = {"warmup": 1, "min_runs": 3, "min_time": 0.0, "max_time": 5.0, "progress": False}


def _model(nodes, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", H])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", H])
    graph = helper.make_graph(nodes, "m", [x], [y], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _fused():
    inits = [
        numpy_helper.from_array(np.ones(H, np.float32), "g"),
        numpy_helper.from_array(np.zeros(H, np.float32), "b"),
    ]
    return _model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, stash_type=1)], inits
    )


def _decomposed():
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["y"]),
    ]
    return _model(nodes, inits)


def test_single_model_levels():
    result = bench(_fused(), provider="cpu", threads=1, **FAST)
    assert isinstance(result, BenchResult)
    assert result.spinning is None
    assert result.provider == "CPUExecutionProvider"
    assert [lv.level for lv in result.levels] == ["disable", "all"]
    for lv in result.levels:
        assert lv.b is None and lv.ratio_median is None
        assert lv.a.runs >= 3
        assert 0 < lv.a.min_ms <= lv.a.median_ms <= lv.a.p90_ms
    assert result.inputs == {"x": {"dtype": "float32", "shape": [2, H]}}


def test_two_models_alternate_and_ratio(tmp_path):
    path = tmp_path / "dec.onnx"
    onnx.save(_decomposed(), path)
    result = bench(path, _fused(), levels="disable", dims={"batch": 4}, spinning=False, **FAST)
    (level,) = result.levels
    assert level.b is not None and level.b.runs == level.a.runs
    assert level.ratio_median is not None and level.ratio_median > 0
    assert result.spinning is False  # alternating sessions: idle pools must not spin
    assert result.model_a == str(path)
    assert result.inputs["x"]["shape"] == [4, H]
    text = result.render_text()
    assert text.startswith("provider: ")
    assert "B vs A at disable" in text
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["levels"][0]["ratio_median"] == pytest.approx(level.ratio_median)
    assert payload["levels"][0]["b"]["runs"] == level.b.runs


def test_max_time_caps_the_loop():
    result = bench(
        _fused(), levels=["all"], warmup=0, min_runs=10**9, min_time=0.0, max_time=0.05, progress=False
    )
    assert 1 <= result.levels[0].a.runs < 10**9


def test_bad_arguments():
    with pytest.raises(InputError):
        bench(_fused(), levels="fastest", **FAST)
    with pytest.raises(InputError):
        bench(_fused(), threads=0, **FAST)
    with pytest.raises(InputError):
        bench(_fused(), **{**FAST, "min_runs": 0})
    other = _model([helper.make_node("Identity", ["x"], ["y"])])
    other.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    other.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(InputError, match="dtype"):
        bench(_fused(), other, **FAST)


def test_progress_bar_goes_to_stderr_and_is_cleared(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(bench_mod.sys, "stderr", stream)
    bench(_fused(), levels="disable", warmup=1, min_runs=3, min_time=0.0, progress=True)
    text = stream.getvalue()
    assert "bench [" in text and text.endswith("\r")
    stream.truncate(0)
    stream.seek(0)
    bench(_fused(), levels="disable", warmup=1, min_runs=3, min_time=0.0, progress=None)  # not a TTY
    assert stream.getvalue() == ""


def test_timing_stats():
    timing = Timing.from_ns([1_000_000, 2_000_000, 3_000_000, 4_000_000])
    assert timing.runs == 4 and timing.min_ms == 1.0 and timing.median_ms == 2.5
    assert 3.0 < timing.p90_ms <= 4.0 and timing.mean_ms == 2.5
    level = LevelResult("all", timing, timing, 1.0)
    assert "same speed" in BenchResult("CPUExecutionProvider", "r", [level]).render_text()


def test_cuda_runner_binds_device_tensors(monkeypatch):
    """The CUDA path cannot run here: check its IO-binding call sequence with fakes."""
    calls: list[tuple] = []

    class FakeValue:
        def __init__(self, tag):
            self.tag = tag

    class FakeBinding:
        def bind_ortvalue_input(self, name, value):
            calls.append(("in", name, value.tag))

        def bind_output(self, name, device, device_id):
            calls.append(("out", name, device, device_id))

        def bind_ortvalue_output(self, name, value):
            calls.append(("out_value", name, value.tag))

        def synchronize_inputs(self):
            calls.append(("sync_in",))

        def synchronize_outputs(self):
            calls.append(("sync_out",))

        def get_outputs(self):
            return [FakeValue("y-buffer")]

    class FakeOutput:
        name = "y"

    class FakeSession:
        binding = FakeBinding()

        def io_binding(self):
            return self.binding

        def get_outputs(self):
            return [FakeOutput()]

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def run_with_iobinding(self, binding):
            calls.append(("run",))

    def from_numpy(array, device, device_id):
        calls.append(("to_device", device, device_id, array.shape))
        return FakeValue(f"dev{array.shape}")

    monkeypatch.setattr(bench_mod.ort.OrtValue, "ortvalue_from_numpy", staticmethod(from_numpy))
    choice = ProviderChoice("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), "test")
    runner = bench_mod._runner(FakeSession(), {"x": np.zeros((2, 3), np.float32)}, choice)
    assert isinstance(runner, bench_mod._CudaRunner)
    runner()
    runner()
    assert calls == [
        ("to_device", "cuda", 0, (2, 3)),
        ("in", "x", "dev(2, 3)"),
        ("out", "y", "cuda", 0),
        ("sync_in",),
        ("run",),
        ("sync_out",),
        ("out_value", "y", "y-buffer"),
        ("run",),
        ("sync_out",),
    ]
    cpu = ProviderChoice("cpu", ("CPUExecutionProvider",), "test")
    assert isinstance(bench_mod._runner(FakeSession(), {}, cpu), bench_mod._CpuRunner)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    @click.group()
    def group() -> None:
        """Throwaway host group for the runtime commands."""

    group.add_command(bench_cmd)
    return group


def test_cli_bench(cli, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_decomposed(), a)
    onnx.save(_fused(), b)
    runner = CliRunner()
    base = ["--runs", "2", "--min-time", "0", "--warmup", "1", "--threads", "1"]
    result = runner.invoke(cli, ["bench", str(a), str(b), *base, "--json", "--no-spinning"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [lv["level"] for lv in payload["levels"]] == ["disable", "all"]
    assert payload["levels"][0]["ratio_median"] > 0
    assert payload["threads"] == 1
    text = runner.invoke(cli, ["bench", str(a), *base, "--level", "extended", "--dim", "batch=3"])
    assert text.exit_code == 0, text.output
    assert text.output.startswith("provider: ") and "extended" in text.output
    assert "B vs A" not in text.output
    for args in (["--level", "max"], ["--dim", "nope=2"], ["--threads", "0"]):
        bad = runner.invoke(cli, ["bench", str(a), *base, *args])
        assert bad.exit_code == 2, (args, bad.output)
    missing = runner.invoke(cli, ["bench", str(tmp_path / "missing.onnx")])
    assert missing.exit_code == 2 and "lnfuse: error:" in missing.output
