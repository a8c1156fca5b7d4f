"""Tests for lnfuse.check (the numeric-equivalence gate) and the ``check`` CLI command."""

from __future__ import annotations

import json

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lnfuse.check import (
    DEFAULT_TOLERANCES,
    CheckResult,
    assert_equivalent,
    check,
    compare_arrays,
    expose_intermediates,
    tolerances_for,
)
from lnfuse.cli_runtime import bench_cmd, check_cmd, parse_dims, parse_ranges
from lnfuse.errors import InputError
from lnfuse.runtime import select_provider

H = 32
NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _finish(nodes, inits, dtype, inputs=None, out_name="y", out_dtype=None, out_shape=None):
    inputs = inputs or [helper.make_tensor_value_info("x", dtype, ["batch", "seq", H])]
    shape = out_shape or ["batch", "seq", H]
    outputs = [helper.make_tensor_value_info(out_name, out_dtype or dtype, shape)]
    graph = helper.make_graph(nodes, "ln", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _affine(dtype, beta_sign=1.0):
    np_dtype = NP[dtype]
    gamma = np.linspace(0.5, 1.5, H).astype(np_dtype)
    beta = (beta_sign * np.linspace(-0.25, 0.25, H)).astype(np_dtype)
    return [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]


def ln_decomposed(eps=1e-5, dtype=TensorProto.FLOAT, beta_sign=1.0, squared_via_transpose=False):
    """The plain PyTorch LayerNorm export: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add."""
    np_dtype = NP[dtype]
    inits = [
        *_affine(dtype, beta_sign),
        numpy_helper.from_array(np.array(2.0, np_dtype), "two"),
        numpy_helper.from_array(np.array(eps, np_dtype), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
    ]
    squared = "sq"
    if squared_via_transpose:
        # A layout round trip: makes ONNX Runtime's CPU EP materialize the fp16 square.
        nodes += [
            helper.make_node("Transpose", ["sq"], ["sq_t"], perm=[2, 1, 0]),
            helper.make_node("Transpose", ["sq_t"], ["sq2"], perm=[2, 1, 0]),
        ]
        squared = "sq2"
    nodes += [
        helper.make_node("ReduceMean", [squared], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _finish(nodes, inits, dtype)


def ln_fused(eps=1e-5, dtype=TensorProto.FLOAT, beta_sign=1.0, out_name="y"):
    node = helper.make_node(
        "LayerNormalization", ["x", "gamma", "beta"], [out_name], axis=-1, epsilon=eps, stash_type=1
    )
    return _finish([node], _affine(dtype, beta_sign), dtype, out_name=out_name)


def _unary(op_nodes, dtype=TensorProto.FLOAT, out_dtype=None, out_shape=None, extra_inits=()):
    return _finish(list(op_nodes), list(extra_inits), dtype, out_dtype=out_dtype, out_shape=out_shape)


# --------------------------------------------------------------------------- check()


def test_decomposed_equals_fused():
    result = check(ln_decomposed(), ln_fused())
    assert result.ok, result.render_text()
    assert result.provider in ort.get_available_providers()
    assert result.provider_reason
    assert result.level == "disable"
    assert result.run_labels == ("seed=0", "seed=1", "large(scale=1000)")
    assert len(result.outputs) == 3
    assert all(c.name == "y" and c.dtype == "float32" and c.shape == (2, 8, H) for c in result.outputs)
    assert result.failures == []
    assert result.inputs == {"x": {"dtype": "float32", "shape": [2, 8, H]}}
    assert assert_equivalent(ln_decomposed(), ln_fused(), runs=1).ok


def test_changed_epsilon_fails_on_small_variance_input():
    result = check(ln_decomposed(eps=1e-5), ln_fused(eps=1e-2), input_ranges={"x": (0.0, 0.1)})
    assert not result.ok
    assert result.failing_outputs == ["y"]
    assert "large" not in " ".join(result.run_labels)  # every float input has an explicit range
    worst = max(result.failures, key=lambda c: c.max_abs)
    assert worst.max_abs > 0.1
    assert worst.worst_index is not None and len(worst.worst_index) == 3


def test_flipped_sign_fails_and_names_output(tmp_path):
    with pytest.raises(AssertionError) as info:
        assert_equivalent(ln_decomposed(), ln_fused(beta_sign=-1.0))
    message = str(info.value)
    assert "output 'y'" in message
    assert "max abs err" in message and "max rel err" in message and "at index (" in message
    # A generous explicit tolerance makes the same pair pass (overrides the dtype defaults).
    assert check(ln_decomposed(), ln_fused(beta_sign=-1.0), atol=1.0).ok
    # Paths work the same as protos.
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(ln_decomposed(), a)
    onnx.save(ln_fused(beta_sign=-1.0), b)
    result = check(str(a), b, runs=1, large_magnitude=False)
    assert not result.ok and result.run_labels == ("seed=0",)
    text = result.render_text()
    assert "provider: " in text and "NOT EQUAL" in text and "'y'" in text


def test_output_name_mismatch():
    result = check(ln_decomposed(), ln_fused(out_name="z"), runs=1)
    assert not result.ok
    reasons = {c.name: c.reason for c in result.failures}
    assert "missing in the candidate" in reasons["y"]
    assert "not in the original" in reasons["z"]


def test_shape_and_dtype_mismatch():
    identity = _unary([helper.make_node("Identity", ["x"], ["y"])])
    wider = _unary(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=-1)],
        out_shape=["batch", "seq", 2 * H],
    )
    result = check(identity, wider, runs=1)
    assert not result.ok and "shape differs" in result.failures[0].reason
    half = _unary(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], out_dtype=TensorProto.FLOAT16
    )
    result = check(identity, half, runs=1)
    assert not result.ok and "dtype differs" in result.failures[0].reason


def test_integer_outputs_compare_exactly():
    shape = ["batch", "seq", 1]
    argmax = _unary(
        [helper.make_node("ArgMax", ["x"], ["y"], axis=-1)], out_dtype=TensorProto.INT64, out_shape=shape
    )
    argmin = _unary(
        [helper.make_node("ArgMin", ["x"], ["y"], axis=-1)], out_dtype=TensorProto.INT64, out_shape=shape
    )
    assert check(argmax, argmax).ok
    result = check(argmax, argmin, rtol=1.0, atol=100.0)  # tolerances never apply to integers
    assert not result.ok and "exact match" in result.failures[0].reason


def test_fixed_overflow_only_when_allowed():
    # sqrt(x*x) overflows float32 for |x| > 1.8e19; abs(x) does not.
    naive = _unary([helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Sqrt", ["sq"], ["y"])])
    stable = _unary([helper.make_node("Abs", ["x"], ["y"])])
    big = {"x": (1e19, 1e20)}
    result = check(naive, stable, input_ranges=big, runs=1)
    assert not result.ok
    assert "original has NaN/Inf" in result.failures[0].reason
    result = check(naive, stable, input_ranges=big, runs=1, allow_fixed_overflow=True)
    assert result.ok
    assert result.fixed_overflows and result.to_dict()["fixed_overflow"] > 0
    assert "fixed overflow" in result.render_text()
    # The re-run of the original with its intermediates exposed names where it overflowed.
    assert result.outputs[0].overflow_at == "sq"
    assert "overflowed internally at 'sq' (inf)" in result.outputs[0].reason
    assert result.to_dict()["fixed_overflow_at"] == ["sq"]
    # The reverse (the candidate overflows where the original is finite) always fails.
    result = check(stable, naive, input_ranges=big, runs=1, allow_fixed_overflow=True)
    assert not result.ok and "candidate has NaN/Inf" in result.failures[0].reason


def _assert_fixed_at_square(result: CheckResult) -> None:
    assert result.ok, result.render_text()
    (fixed,) = result.fixed_overflows
    assert fixed.name == "y" and fixed.run_label == "large(scale=300)"
    assert fixed.overflow_at == "sq" and fixed.mismatched == 0 and fixed.fixed_overflow > 0
    assert "original overflowed internally at 'sq' (inf); candidate finite" in fixed.reason
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["fixed_overflow"] == fixed.fixed_overflow
    assert payload["fixed_overflow_at"] == ["sq"]
    assert payload["outputs"][-1]["overflow_at"] == "sq"
    text = result.render_text()
    assert "ok (fixed overflow)" in text and "overflowed internally at 'sq'" in text


def _assert_beta_collapse_rejected(result: CheckResult) -> None:
    assert not result.ok
    assert result.failing_outputs == ["y"]
    assert [c.run_label for c in result.failures] == ["large(scale=300)"]
    assert result.fixed_overflows == []
    assert "exceed atol" in result.failures[0].reason  # finite but wrong, not NaN/Inf


def test_fp16_layernorm_large_magnitude():
    f16 = TensorProto.FLOAT16
    decomposed, fused = ln_decomposed(dtype=f16), ln_fused(dtype=f16)
    result = check(decomposed, fused)
    assert result.run_labels[-1] == "large(scale=300)"
    assert result.to_dict()["outputs"][0]["rtol"] == DEFAULT_TOLERANCES["float16"][0]
    if select_provider("auto").name == "cpu":
        # ONNX Runtime's CPU EP runs fp16 ops that lack fp16 kernels in fp32 (inserted
        # casts), so the plain decomposed fp16 chain does not overflow and matches.
        assert result.ok, result.render_text()
        assert check(decomposed, fused, allow_fixed_overflow=True).fixed_overflows == []
    else:
        # On CUDA Pow(d, 2) is computed in fp16: inf for |x - mean| > 256, the variance is
        # inf, d / sqrt(inf) = 0 and the output collapses to beta (finite but wrong).
        _assert_beta_collapse_rejected(result)
        _assert_fixed_at_square(check(decomposed, fused, allow_fixed_overflow=True))

    # A materialized fp16 square overflows on every provider (the CPU EP included): by
    # default a plain mismatch on the large run; accepted only with allow_fixed_overflow.
    overflowing = ln_decomposed(dtype=f16, squared_via_transpose=True)
    assert check(overflowing, fused, large_magnitude=False).ok
    result = check(overflowing, fused)
    if result.ok:
        pytest.skip("this onnxruntime build keeps the fp16 square in fp32")
    _assert_beta_collapse_rejected(result)
    _assert_fixed_at_square(check(overflowing, fused, allow_fixed_overflow=True))
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(150, 300, size=(2, 8, H)).astype(np.float16)
    assert np.isfinite(session.run(None, {"x": x})[0]).all()  # stash_type=1 stays finite


def _ln_then(nodes, inits, dtype=TensorProto.FLOAT16):
    """The fused LayerNorm of x into 'ln', followed by ``nodes`` that produce 'y'."""
    ln = helper.make_node(
        "LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5, stash_type=1
    )
    return _finish([ln, *nodes], [*_affine(dtype), *inits], dtype)


def test_fixed_overflow_rejects_a_square_that_only_overflows_when_exposed():
    # On the CPU EP the plain fp16 chain computes Pow..Sqrt in fp32: exposing 'sq' as an fp16
    # output reads inf, but the chain never overflowed (its output is right). A candidate
    # that is wrong on large inputs only (clips x) must not be excused by that inf.
    f16 = TensorProto.FLOAT16
    lo = numpy_helper.from_array(np.array(-200.0, np.float16), "lo")
    hi = numpy_helper.from_array(np.array(200.0, np.float16), "hi")
    clipped = _finish(
        [
            helper.make_node("Clip", ["x", "lo", "hi"], ["xc"]),
            helper.make_node(
                "LayerNormalization", ["xc", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5, stash_type=1
            ),
        ],
        [*_affine(f16), lo, hi],
        f16,
    )
    original = ln_decomposed(dtype=f16)
    assert check(original, clipped, provider="cpu", large_magnitude=False).ok
    result = check(original, clipped, provider="cpu", allow_fixed_overflow=True)
    assert not result.ok and result.fixed_overflows == []
    reason = result.failures[0].reason
    assert "not a fixed overflow" in reason and "'sq'" in reason and "feeding that value back" in reason


def test_fixed_overflow_needs_a_finite_candidate():
    # The candidate goes NaN on the large run (inf * 0): never a fixed overflow.
    f16 = TensorProto.FLOAT16
    zero = numpy_helper.from_array(np.array(0.0, np.float16), "zero")
    nan_on_large = _ln_then(
        [
            helper.make_node("Mul", ["x", "x"], ["xx"]),
            helper.make_node("Transpose", ["xx"], ["xx_t"], perm=[2, 1, 0]),
            helper.make_node("Transpose", ["xx_t"], ["xx2"], perm=[2, 1, 0]),
            helper.make_node("Mul", ["xx2", "zero"], ["z"]),
            helper.make_node("Add", ["ln", "z"], ["y"]),
        ],
        [zero],
    )
    original = ln_decomposed(dtype=f16, squared_via_transpose=True)
    assert check(original, nan_on_large, large_magnitude=False).ok
    result = check(original, nan_on_large, allow_fixed_overflow=True)
    assert not result.ok and result.fixed_overflows == []
    assert "candidate has NaN/Inf" in result.failures[0].reason


def test_fixed_overflow_needs_an_overflow_in_the_original():
    result = check(ln_decomposed(), ln_fused(beta_sign=-1.0), runs=1, allow_fixed_overflow=True)
    assert not result.ok and result.fixed_overflows == []
    assert all("no non-finite intermediate" in c.reason for c in result.failures)


def test_expose_intermediates_main_graph_float_tensors_only():
    f = TensorProto.FLOAT
    then_branch = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["inner"]),
            helper.make_node("Relu", ["inner"], ["then_out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", f, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", f, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Shape", ["a"], ["shape"]),  # int64: not exposed
        helper.make_node("If", ["cond"], ["branched"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Mystery", ["a"], ["unknown"], domain="custom.domain"),  # type unknown
        helper.make_node("Add", ["branched", "a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f, [2, 3])],
        [helper.make_tensor_value_info("y", f, [2, 3])],
        [cond],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.domain", 1)],
        ir_version=8,
    )
    before = model.SerializeToString()
    exposed, names = expose_intermediates(model)
    assert names == ["a", "branched"]
    assert [o.name for o in exposed.graph.output] == ["y", "a", "branched"]
    assert all(o.type.tensor_type.elem_type == f for o in exposed.graph.output)
    assert model.SerializeToString() == before


def test_candidate_runtime_failure_is_not_equal():
    identity = _unary([helper.make_node("Identity", ["x"], ["y"])])
    shape = numpy_helper.from_array(np.array([-1, 7, 1], np.int64), "shape")
    broken = _finish(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [shape],
        TensorProto.FLOAT,
        out_shape=["a", "b", "c"],
    )
    result = check(identity, broken, runs=1, large_magnitude=False)
    assert not result.ok and "candidate failed to run" in result.failures[0].reason


def test_inputs_that_do_not_fit_raise_input_error(tmp_path):
    as_double = _finish(
        [helper.make_node("Identity", ["x"], ["y"])],
        [],
        TensorProto.DOUBLE,
    )
    with pytest.raises(InputError, match="dtype"):
        check(_unary([helper.make_node("Identity", ["x"], ["y"])]), as_double, runs=1)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(InputError):
        check(bad, ln_fused())
    with pytest.raises(InputError):
        check(ln_decomposed(), ln_fused(), level="max")
    with pytest.raises(InputError):
        check(ln_decomposed(), ln_fused(), runs=0)


def test_explicit_inputs_dict_and_npz(tmp_path):
    x = np.random.default_rng(5).normal(size=(3, 5, H)).astype(np.float32)
    result = check(ln_decomposed(), ln_fused(), inputs={"x": x})
    assert result.ok and result.run_labels == ("inputs",)
    assert result.inputs["x"]["shape"] == [3, 5, H]
    path = tmp_path / "in.npz"
    np.savez(path, x=x)
    assert check(ln_decomposed(), ln_fused(beta_sign=-1.0), inputs=str(path)).ok is False
    with pytest.raises(InputError):
        check(ln_decomposed(), ln_fused(), inputs={"x": x.astype(np.float64)})


def test_result_json_roundtrip():
    result = check(ln_decomposed(), ln_fused(out_name="z"), runs=1)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["ok"] is False and payload["verdict"] == "not equal"
    assert set(payload["failing_outputs"]) == {"y", "z"}
    assert payload["provider"] == result.provider
    assert isinstance(result, CheckResult)


# --------------------------------------------------------------------------- compare_arrays


def test_compare_arrays_tolerance_rule_and_worst_index():
    ref = np.array([[1.0, 2.0], [3.0, 100.0]], np.float32)
    got = ref.copy()
    got[1, 1] += 100.0 * 1e-5  # within atol + rtol*|ref| = 1e-5 + 1e-3
    assert compare_arrays("y", ref, got).ok
    got[0, 1] += 1e-3  # beyond 1e-5 + 2e-5
    comp = compare_arrays("y", ref, got)
    assert not comp.ok and comp.worst_index == (0, 1) and comp.mismatched == 1 and comp.total == 4
    assert comp.max_abs == pytest.approx(1e-3, rel=1e-2)
    assert comp.max_rel == pytest.approx(5e-4, rel=1e-2)
    assert compare_arrays("y", ref, got, rtol=0.0, atol=1e-2).ok


def test_compare_arrays_nonfinite_rules():
    nan, inf = np.nan, np.inf
    ref = np.array([1.0, nan, inf, -inf], np.float16)
    assert compare_arrays("y", ref, ref.copy()).ok  # same NaN / same inf are equal
    flipped = np.array([1.0, nan, -inf, -inf], np.float16)
    comp = compare_arrays("y", ref, flipped, allow_fixed_overflow=True)
    assert not comp.ok and comp.worst_index == (2,) and "differ" in comp.reason
    cand_bad = np.array([nan, nan, inf, -inf], np.float16)
    comp = compare_arrays("y", ref, cand_bad, allow_fixed_overflow=True)
    assert not comp.ok and comp.worst_index == (0,) and "candidate has NaN/Inf" in comp.reason
    fixed = np.array([1.0, 0.5, 60000.0, -inf], np.float16)
    comp = compare_arrays("y", ref, fixed)
    assert not comp.ok and "original has NaN/Inf" in comp.reason and comp.worst_index == (1,)
    comp = compare_arrays("y", ref, fixed, allow_fixed_overflow=True)
    assert comp.ok and comp.fixed_overflow == 2 and "fixed overflow" in comp.reason


def test_compare_arrays_edge_cases():
    assert not compare_arrays("y", np.zeros(3, np.float32), np.zeros(4, np.float32)).ok
    assert not compare_arrays("y", np.zeros(3, np.float32), np.zeros(3, np.float64)).ok
    assert compare_arrays("y", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)).ok
    bools = compare_arrays("b", np.array([True, False]), np.array([True, True]))
    assert not bools.ok and bools.worst_index == (1,)
    ints = compare_arrays("i", np.array([1, 5], np.uint8), np.array([1, 2], np.uint8))
    assert not ints.ok and ints.max_abs == 3.0
    assert tolerances_for(np.float32) == (1e-5, 1e-5)
    assert tolerances_for(np.float16) == (1e-2, 1e-2)
    assert tolerances_for(np.float64) == (1e-7, 1e-7)
    assert tolerances_for(np.int64, 1.0, 1.0) == (0.0, 0.0)
    assert tolerances_for(np.float32, rtol=0.5) == (0.5, 1e-5)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    @click.group()
    def group() -> None:
        """Throwaway host group for the runtime commands."""

    group.add_command(check_cmd)
    group.add_command(bench_cmd)
    return group


@pytest.fixture
def model_files(tmp_path):
    paths = {}
    for name, model in (("dec", ln_decomposed()), ("fused", ln_fused()), ("bad", ln_fused(beta_sign=-1.0))):
        paths[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(model, paths[name])
    paths["junk"] = str(tmp_path / "junk.onnx")
    with open(paths["junk"], "wb") as fh:
        fh.write(b"junk")
    return paths


def test_cli_check_exit_codes(cli, model_files):
    runner = CliRunner()
    ok = runner.invoke(cli, ["check", model_files["dec"], model_files["fused"], "--runs", "1"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("provider: ")
    assert "EQUAL" in ok.output
    bad = runner.invoke(cli, ["check", model_files["dec"], model_files["bad"], "--runs", "1"])
    assert bad.exit_code == 1
    assert "NOT EQUAL" in bad.output and "'y'" in bad.output
    for args in (
        [model_files["dec"], model_files["junk"]],
        [model_files["dec"], model_files["fused"], "--dim", "batch"],
        [model_files["dec"], model_files["fused"], "--dim", "nope=2"],
        [model_files["dec"], model_files["fused"], "--input-range", "x=3:1"],
        [model_files["dec"], model_files["fused"], "--level", "max"],
        [model_files["dec"], model_files["fused"], "--atol", "-1"],
        [model_files["dec"], "/nonexistent/model.onnx"],
    ):
        result = runner.invoke(cli, ["check", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output


def test_cli_check_error_message_is_one_line(model_files):
    result = CliRunner().invoke(check_cmd, [model_files["dec"], model_files["junk"]])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lnfuse: error: ")


def test_cli_check_json_and_options(cli, model_files):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "check",
            model_files["dec"],
            model_files["fused"],
            "--json",
            "--runs",
            "1",
            "--dim",
            "batch=3",
            "--dim",
            "seq=2",
            "--seed",
            "7",
            "--no-large-magnitude",
            "--provider",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["ok"] is True
    assert payload["provider"] == "CPUExecutionProvider"
    assert payload["provider_reason"] == "CPU requested"
    assert payload["runs"] == ["seed=7"]
    assert payload["inputs"]["x"]["shape"] == [3, 2, H]
    bad = runner.invoke(cli, ["check", model_files["dec"], model_files["bad"], "--json", "--runs", "1"])
    assert bad.exit_code == 1 and json.loads(bad.output)["failing_outputs"] == ["y"]


def test_parse_helpers():
    assert parse_dims(["batch=2", " seq = 16 "]) == {"batch": 2, "seq": 16}
    assert parse_ranges(["x=-1:1", "ids=0:50"]) == {"x": (-1.0, 1.0), "ids": (0.0, 50.0)}
    for bad in (["batch"], ["batch=two"], ["=3"], ["b=0"]):
        with pytest.raises(InputError):
            parse_dims(bad)
    for bad in (["x=1"], ["x=a:b"], ["x=2:1"], ["=0:1"], ["x=0:inf"]):
        with pytest.raises(InputError):
            parse_ranges(bad)
