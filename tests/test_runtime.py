"""Tests for lnfuse.runtime: provider fallback, sessions, input synthesis and loading."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lnfuse.errors import InputError, ProviderError
from lnfuse.runtime import (
    LEVELS,
    ProviderChoice,
    load_inputs_npz,
    make_session,
    select_provider,
    synthesize_inputs,
    validate_feeds,
)

runtime = importlib.import_module("lnfuse.runtime")

CPU = ProviderChoice("cpu", ("CPUExecutionProvider",), "test")


def _model(inputs, nodes, outputs, initializers=(), opset=17, check=True):
    graph = helper.make_graph(list(nodes), "t", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _identity(dtype=TensorProto.FLOAT, shape=("batch", 4)):
    return _model(
        [helper.make_tensor_value_info("x", dtype, list(shape))],
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("y", dtype, list(shape))],
    )


def _cuda_works() -> bool:
    return select_provider("auto").name == "cuda"


# --------------------------------------------------------------------------- providers


def test_auto_falls_back_to_cpu_with_reason():
    choice = select_provider("auto")
    if choice.name == "cuda":
        assert choice.providers[0] == "CUDAExecutionProvider"
        return
    assert choice.providers == ("CPUExecutionProvider",)
    assert choice.reason.startswith("CUDA unavailable: ")
    assert len(choice.reason) > len("CUDA unavailable: ")
    assert "\n" not in choice.reason


def test_explicit_cuda_raises_provider_error_when_unavailable():
    if _cuda_works():
        pytest.skip("CUDA works on this machine")
    with pytest.raises(ProviderError) as info:
        select_provider("cuda")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_cpu_and_bad_names():
    assert select_provider("cpu") == ProviderChoice("cpu", ("CPUExecutionProvider",), "CPU requested")
    assert select_provider("CPU").name == "cpu"
    with pytest.raises(InputError):
        select_provider("tpu")


def test_probe_is_quiet_and_cached(monkeypatch, capfd):
    monkeypatch.setattr(runtime, "_cuda_probe", None)
    first = select_provider("auto")
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err
    assert "Failed" not in captured.err
    calls = []
    monkeypatch.setattr(runtime, "_probe_cuda", lambda: calls.append(1) or (False, "x"))
    assert select_provider("auto") == first
    assert calls == []


def test_probe_reports_missing_build(monkeypatch):
    monkeypatch.setattr(runtime, "_cuda_probe", None)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    choice = select_provider("auto")
    assert choice.name == "cpu"
    assert "not in this onnxruntime build" in choice.reason
    monkeypatch.setattr(runtime, "_cuda_probe", None)


def test_first_useful_line_extraction():
    spew = (
        "\x1b[1;31m2026-01-01 00:00:00.0 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/src/provider_bridge_ort.cc:2043 Failed to load library libonnxruntime_providers_cuda.so with error: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory\n\x1b[m\n"
        "[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295] Failed to create CUDAExecutionProvider. Require cuDNN"
    )
    assert runtime._first_useful_line(spew) == "libcublasLt.so.13: cannot open shared object file"
    other = "2026 [E:onnxruntime:Default, x.cc:1 f] CUDA failure 100: no CUDA-capable device is detected"
    assert "no CUDA-capable device" in runtime._first_useful_line(other)
    assert runtime._first_useful_line("", "") == ""


# --------------------------------------------------------------------------- sessions


def test_levels_table():
    assert set(LEVELS) == {"disable", "basic", "extended", "all"}
    assert LEVELS["disable"] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert LEVELS["all"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_make_session_from_proto_bytes_and_path(tmp_path):
    model = _identity()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.ones((2, 4), np.float32)
    for source in (model, model.SerializeToString(), str(path), path):
        for level in LEVELS:
            sess = make_session(source, CPU, level, threads=1, spinning=False)
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x)


def test_make_session_with_external_data(tmp_path, monkeypatch):
    weight = np.arange(4096, dtype=np.float32).reshape(1, 4096)
    model = _model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "ext.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # save_model with external data rewrites the proto it is given
    onnx.save_model(on_disk, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    sess = make_session(path, CPU)
    np.testing.assert_array_equal(sess.run(None, {"x": np.zeros((1, 4096), np.float32)})[0], weight)
    # Force the "too big for one protobuf" path: the proto goes through a temp dir.
    monkeypatch.setattr(runtime, "_PROTOBUF_LIMIT", 10)
    sess = make_session(model, CPU)
    np.testing.assert_array_equal(sess.run(None, {"x": np.ones((1, 4096), np.float32)})[0], weight + 1)


def test_make_session_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        make_session(tmp_path / "missing.onnx", CPU)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model at all")
    with pytest.raises(InputError) as info:
        make_session(bad, CPU)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="level"):
        make_session(_identity(), CPU, "fast")
    with pytest.raises(InputError, match="threads"):
        make_session(_identity(), CPU, threads=0)


# --------------------------------------------------------------------------- synthesis


def test_dynamic_dims_defaults_and_consistency():
    model = _model(
        [
            helper.make_tensor_value_info(
                "a", TensorProto.FLOAT, ["batch_size", "sequence_length", "hidden", None]
            ),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch_size", 3, "time"]),
        ],
        [helper.make_node("Identity", ["a"], ["y"]), helper.make_node("Identity", ["b"], ["z"])],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["batch_size", "sequence_length", "hidden", None]
            ),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch_size", 3, "time"]),
        ],
    )
    feeds = synthesize_inputs(model)
    assert feeds["a"].shape == (2, 8, 4, 4)
    assert feeds["b"].shape == (2, 3, 8)
    feeds = synthesize_inputs(model, dims={"batch_size": 5, "hidden": 16})
    assert feeds["a"].shape == (5, 8, 16, 4)
    assert feeds["b"].shape[0] == 5
    with pytest.raises(InputError, match="unknown dimension"):
        synthesize_inputs(model, dims={"nope": 3})
    with pytest.raises(InputError):
        synthesize_inputs(model, dims={"hidden": 0})


def test_float_inputs_seeded_offset_and_scaled():
    model = _identity(shape=(64, 64))
    a = synthesize_inputs(model, seed=0)["x"]
    b = synthesize_inputs(model, seed=0)["x"]
    c = synthesize_inputs(model, seed=1)["x"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32
    assert 0.4 < a.mean() < 0.6  # non-zero mean exposes LayerNorm mean bugs
    big = synthesize_inputs(model, seed=0, scale=1000.0)["x"]
    np.testing.assert_allclose(big, a * 1000.0, rtol=1e-5)
    ranged = synthesize_inputs(model, input_ranges={"x": (2.0, 3.0)})["x"]
    assert ranged.min() >= 2.0 and ranged.max() <= 3.0
    with pytest.raises(InputError, match="unknown input"):
        synthesize_inputs(model, input_ranges={"q": (0.0, 1.0)})
    for dtype, np_dtype in ((TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)):
        assert synthesize_inputs(_identity(dtype))["x"].dtype == np_dtype


def test_integer_bool_heuristics():
    shape = ["batch", "seq"]
    names = ["input_ids", "attention_mask", "position_ids", "token_type_ids", "level", "flag"]
    types = [TensorProto.INT64] * 4 + [TensorProto.INT32, TensorProto.BOOL]
    model = _model(
        [helper.make_tensor_value_info(n, t, shape) for n, t in zip(names, types, strict=True)],
        [helper.make_node("Identity", [n], [f"o{i}"]) for i, n in enumerate(names)],
        [helper.make_tensor_value_info(f"o{i}", t, shape) for i, t in enumerate(types)],
    )
    feeds = synthesize_inputs(model, seed=3)
    assert feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 100
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1}
    np.testing.assert_array_equal(feeds["position_ids"], np.broadcast_to(np.arange(8), (2, 8)))
    assert set(np.unique(feeds["token_type_ids"])) <= {0, 1}
    assert (feeds["attention_mask"][..., 0] == 1).all()
    assert feeds["level"].dtype == np.int32 and feeds["level"].min() >= 0 and feeds["level"].max() < 10
    assert feeds["flag"].dtype == np.bool_
    over = synthesize_inputs(model, input_ranges={"input_ids": (5, 7)})["input_ids"]
    assert set(np.unique(over)) <= {5, 6}


def test_initializer_inputs_skipped_and_bf16_rejected():
    model = _model(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    assert list(synthesize_inputs(model)) == ["x"]
    bf16 = _model(
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    with pytest.raises(InputError, match="bfloat16"):
        synthesize_inputs(bf16)


def test_unknown_rank_rejected():
    model = _model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        check=False,
    )
    with pytest.raises(InputError, match="unknown rank"):
        synthesize_inputs(model)


# --------------------------------------------------------------------------- npz inputs


def test_load_inputs_npz_validation(tmp_path):
    model = _model(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("m", TensorProto.INT64, ["batch", 4]),
        ],
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["m"], ["z"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["batch", 4]),
        ],
    )
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 4), np.float32), m=np.zeros((3, 4), np.int64))
    feeds = load_inputs_npz(good, model)
    assert feeds["x"].shape == (3, 4)

    cases = {
        "missing": ({"x": np.zeros((3, 4), np.float32)}, "missing"),
        "extra": (
            {"x": np.zeros((3, 4), np.float32), "m": np.zeros((3, 4), np.int64), "q": np.zeros(1)},
            "not an input",
        ),
        "dtype": ({"x": np.zeros((3, 4), np.float64), "m": np.zeros((3, 4), np.int64)}, "dtype"),
        "static": ({"x": np.zeros((3, 5), np.float32), "m": np.zeros((3, 5), np.int64)}, "axis 1"),
        "rank": ({"x": np.zeros((3,), np.float32), "m": np.zeros((3, 4), np.int64)}, "rank"),
        "symbol": ({"x": np.zeros((3, 4), np.float32), "m": np.zeros((2, 4), np.int64)}, "batch"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(InputError, match=message) as info:
            load_inputs_npz(path, model)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="not found"):
        load_inputs_npz(tmp_path / "none.npz", model)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    with pytest.raises(InputError):
        load_inputs_npz(junk, model)
    assert validate_feeds(model, {"x": np.zeros((1, 4), np.float32), "m": np.zeros((1, 4), np.int64)})
