"""Linear-time regression guard: a 200-block decomposed-LN chain optimized in-process.

The model comes from :func:`benchmarks.gen_chain.build_chain` (the generator of the scale benchmark,
``benchmarks/bench_scale.py``): 200 x (ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma,
Add beta, Add const, Relu) = 2,200 nodes. Every LN must be fused, the output must pass the full
checker, and its output must equal the original's on ONNX Runtime (``ORT_DISABLE_ALL``) and a float64
numpy reference. No timing is asserted: the benchmark reports timings, this test only makes sure the
path the benchmark measures stays correct at a size where a quadratic step would already show up in CI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lnfuse
from benchmarks.gen_chain import build_chain, build_transformer, make_input, reference_chain

N_BLOCKS = 200


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, feed)
    return y


@pytest.fixture(scope="module")
def chain() -> tuple[onnx.ModelProto, lnfuse.OptimizeResult]:
    gen = build_chain(N_BLOCKS)
    assert gen.expected_ln == N_BLOCKS
    assert len(gen.model.graph.node) == 11 * N_BLOCKS
    return gen.model, lnfuse.optimize(gen.model)


def test_every_block_is_fused(chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult]) -> None:
    _model, result = chain
    assert result.changed
    assert len(result.report.matches) == N_BLOCKS
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("LayerNormalization") == N_BLOCKS
    # Each block is LayerNormalization, Add(const), Relu: nothing of the decomposition is left.
    assert len(ops) == 3 * N_BLOCKS
    assert not {"ReduceMean", "Sub", "Pow", "Sqrt", "Div"} & set(ops)
    assert {m.epsilon for m in result.report.matches} == {float(np.float32(1e-5))}


def test_output_passes_full_checker(chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult]) -> None:
    _model, result = chain
    onnx.checker.check_model(result.model, full_check=True)


def test_numerics_equal(chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult]) -> None:
    model, result = chain
    feed = make_input(model, seed=3)
    before = _run(model, feed).astype(np.float64)
    after = _run(result.model, feed).astype(np.float64)
    ref = reference_chain(feed["x"], N_BLOCKS)
    # fp32 LayerNorm per block re-normalizes the rounding error of the previous ones, so the error
    # stays at a few fp32 ulps of the O(1) values whatever the chain length.
    scale = max(1.0, float(np.max(np.abs(ref))))
    assert float(np.max(np.abs(after - before))) <= 1e-4 * scale
    assert float(np.max(np.abs(after - ref))) <= 1e-4 * scale


def test_second_optimize_changes_nothing(chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult]) -> None:
    _model, result = chain
    assert lnfuse.optimize(result.model).changed is False


def test_small_transformer_is_fused() -> None:
    gen = build_transformer(4)
    result = lnfuse.optimize(gen.model)
    onnx.checker.check_model(result.model, full_check=True)
    assert sum(n.op_type == "LayerNormalization" for n in result.model.graph.node) == gen.expected_ln == 9
    feed = make_input(gen.model, seed=5)
    a, b = _run(gen.model, feed), _run(result.model, feed)
    assert float(np.max(np.abs(a - b))) <= 1e-4 * max(1.0, float(np.max(np.abs(a))))


def test_bounded_constant_caches_change_nothing(
    chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walker's constant caches, and the graph's constant and dtype caches, are cleared when
    full: with room for only a few entries (cleared many times a model), the chain fuses to the
    same bytes and the same report."""
    from lnfuse import graph, matcher

    model, result = chain
    monkeypatch.setattr(matcher, "CONST_CACHE_LIMIT", 3)
    monkeypatch.setattr(graph, "CONST_CACHE_LIMIT", 3)
    small = lnfuse.optimize(model)
    assert small.model.SerializeToString(deterministic=True) == result.model.SerializeToString(
        deterministic=True
    )
    assert small.report.matches == result.report.matches
    assert small.report.refusals == result.report.refusals


def test_compacted_output_is_the_same_model(
    chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A model loaded from a path is rewritten in place; once enough nodes were rewritten away
    (``api.COMPACT_NODES``) it is parsed anew before the output check, to give back the storage
    of the nodes it lost. The result is the same model either way, and the input file is untouched."""
    from lnfuse import api
    from lnfuse import io as lio

    model, result = chain
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    loaded: list[onnx.ModelProto] = []
    real_load = lio.load_model

    def spy(p: object, **kw: object) -> onnx.ModelProto:
        loaded.append(real_load(p, **kw))  # type: ignore[arg-type]
        return loaded[-1]

    monkeypatch.setattr(lio, "load_model", spy)
    want = result.model.SerializeToString(deterministic=True)
    for limit, fresh in ((1, True), (10**9, False)):
        monkeypatch.setattr(api, "COMPACT_NODES", limit)
        out = lnfuse.optimize(path)
        assert (out.model is not loaded[-1]) is fresh
        assert out.model.SerializeToString(deterministic=True) == want
        assert out.report.matches == result.report.matches
    assert path.read_bytes() == before


def test_output_check_reads_a_file(
    chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full check is run on a file: given a model in memory, onnx's checker copies it whole
    before shape inference (50 MiB more on the fused 110k-node chain)."""
    model, _result = chain
    given: list[object] = []
    real = onnx.checker.check_model

    def spy(m: object, full_check: bool = False, **kw: object) -> None:
        if full_check:
            given.append(m)
        real(m, full_check, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    assert lnfuse.optimize(model).changed
    assert given and all(isinstance(m, str) for m in given)


def test_settled_plans_rewrite_the_same(
    chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted candidates wait for the rewrite phase settled (NormRule.settled: the walk's values
    and the initializers' copies dropped); rewriting from the full candidates gives the same model."""
    from lnfuse.matcher import NO_FLAGS, SPENT
    from lnfuse.rules import NormRule

    model, result = chain
    seen: list[tuple] = []
    real = NormRule.settled

    def spy(self: NormRule, cand: object, params: object) -> tuple:
        seen.append(real(self, cand, params))  # type: ignore[arg-type]
        return cand, params

    monkeypatch.setattr(NormRule, "settled", spy)
    full = lnfuse.optimize(model)
    assert full.model.SerializeToString(deterministic=True) == result.model.SerializeToString(
        deterministic=True
    )
    assert len(seen) == N_BLOCKS
    for cand, params in seen:
        assert cand.valued is NO_FLAGS and cand.form.scale is SPENT
        assert params.scale is SPENT and params.bias is SPENT  # gamma / beta are initializers


def test_proof_keys_from_shared_attribute_sets_are_the_same(
    chain: tuple[onnx.ModelProto, lnfuse.OptimizeResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prover works out each shared attribute set's part of a proof key once: the keys are those
    the plain computation gives, and one proof still covers every identical block."""
    from lnfuse import verify

    model, _result = chain
    real = verify._signature
    compared: list[int] = []

    def spy(mg: object, cand: object, params: object, attrs_key: object = verify._attrs_key) -> tuple:
        key = real(mg, cand, params, attrs_key)  # type: ignore[arg-type]
        assert key == real(mg, cand, params)  # type: ignore[arg-type]
        compared.append(1)
        return key

    monkeypatch.setattr(verify, "_signature", spy)
    for m in (model, build_transformer(2).model):
        result = lnfuse.optimize(m)
        assert result.changed
    assert len(compared) == N_BLOCKS + 5  # every candidate's key compared (2 layers: 5 norms)
    assert lnfuse.optimize(model).report.proofs_run == 1
