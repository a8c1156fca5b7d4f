"""``optimize``: load, fuse every decomposed norm, raise the opset when exact, check, report.

The result is always valid ONNX: a default-domain ``LayerNormalization`` is only
emitted into a model whose opset is (or can exactly be raised to) 17, an
``RMSNormalization`` only at 23; the output must pass
``onnx.checker.check_model(full_check=True)`` or the original model is returned
unchanged with the reason in the report. A model in which nothing was rewritten
is returned as the very same ``ModelProto``, so optimizing twice changes nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from lnfuse import anchors as anchors_mod
from lnfuse import opset as opset_mod
from lnfuse.errors import InputError
from lnfuse.graph import ModelGraph
from lnfuse.pipeline import PassContext
from lnfuse.protos import INFER_LIMIT, copy_fields, iter_nodes, serialized_below, tensor_nbytes
from lnfuse.report import Group, Report
from lnfuse.rules import MIN_OPSET

MIN_SUPPORTED_OPSET = 7
LAZY_ABOVE = 1 << 20  # lazy_external: weights over this many bytes stay on disk
# A rewritten model is compacted before its output check (_compact) when this many nodes were
# rewritten away (below it, the storage kept is under 2 MiB) and while its weights are below
# COMPACT_WEIGHTS bytes (the fresh parse briefly holds them twice).
COMPACT_NODES = 4096
COMPACT_WEIGHTS = 64 << 20


@dataclass
class OptimizeResult:
    """The optimized model, whether it changed, and the report."""

    model: onnx.ModelProto
    report: Report
    changed: bool
    # With ``lazy_external``: the directory the model's still-external weights are relative to.
    external_dir: Path | None = None
    # When optimize() was given an onnx_graphsurgeon.Graph: the result as one (public
    # gs.import_onnx of ``model``), for TensorRT pipelines.
    graph: object | None = None

    def save(self, path: str | os.PathLike, **options: object) -> Path:
        """Write the model atomically (``lnfuse.io.save_model``), streaming weights left on disk."""
        from lnfuse import io as lio

        if self.external_dir is not None:
            options.setdefault("external_source", self.external_dir)
        return lio.save_model(self.model, path, **options)  # type: ignore[arg-type]


def _load(
    model_or_path: onnx.ModelProto | str | os.PathLike, lazy: bool = False
) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "<model>"
    from lnfuse import io as lio

    model = lio.load_model(model_or_path, keep_external_above=LAZY_ABOVE if lazy else None)
    return model, os.fspath(model_or_path)


def optimize(
    model: onnx.ModelProto | str | os.PathLike | object,
    *,
    rmsnorm: bool = False,
    hoist: bool = True,
    verify: bool = True,
    allow_transpose: bool = True,
    target_opset: int | None = None,
    check_output: bool = True,
    allow_invalid: bool = False,
    passes: tuple | None = None,
    lazy_external: bool = False,
) -> OptimizeResult:
    """Fuse decomposed LayerNorm (and, with ``rmsnorm=True``, RMSNorm) in ``model``.

    ``model`` is a ``ModelProto`` (not modified), an ``onnx_graphsurgeon.Graph`` (not modified;
    the result is also given as one, ``result.graph``) or a path (loaded here, so its weights
    move into the result rather than being copied: a path costs less memory); a model that fails
    ``onnx.checker`` is refused unless ``allow_invalid``. ``verify`` runs the
    per-match numeric proof on ONNX Runtime (CPU, tiny tensors). ``target_opset``
    raises the default opset to at least that version (exactly, or not at all).
    ``lazy_external`` (a path only): initializers over 1 MiB stored as external data are never
    read; the result still references them and :meth:`OptimizeResult.save` copies them into the
    output's data file in chunks (peak memory no longer grows with the weights).
    Returns an :class:`OptimizeResult`; raises :class:`~lnfuse.errors.InputError`
    for unusable input.
    """
    gs_graph = _is_graphsurgeon_graph(model)
    if gs_graph:
        import onnx_graphsurgeon as gs

        model = gs.export_onnx(model)  # type: ignore[arg-type]
    result = _optimize(
        model,
        rmsnorm=rmsnorm,
        hoist=hoist,
        verify=verify,
        allow_transpose=allow_transpose,
        target_opset=target_opset,
        check_output=check_output,
        allow_invalid=allow_invalid,
        passes=passes,
        lazy=lazy_external,
    )
    if lazy_external and not isinstance(model, onnx.ModelProto):
        result.external_dir = Path(os.fspath(model)).parent
    if gs_graph:
        import onnx_graphsurgeon as gs

        result.graph = gs.import_onnx(result.model)
    return result


def _is_graphsurgeon_graph(obj: object) -> bool:
    """An ``onnx_graphsurgeon.Graph`` (checked without importing onnx-graphsurgeon)."""
    cls = type(obj)
    return cls.__name__ == "Graph" and cls.__module__.startswith("onnx_graphsurgeon")


def _optimize(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    rmsnorm: bool,
    hoist: bool,
    verify: bool,
    allow_transpose: bool,
    target_opset: int | None,
    check_output: bool,
    allow_invalid: bool,
    passes: tuple | None,
    lazy: bool = False,
) -> OptimizeResult:
    times = [time.perf_counter()]
    proto, report = _load_checked(model, lazy, allow_invalid)
    old = report.opset_before
    times.append(time.perf_counter())
    try:
        mg = ModelGraph(proto)
    except Exception as err:  # a graph too malformed to index
        raise InputError(f"{report.source}: cannot import graph: {str(err).splitlines()[0][:200]}") from None
    report.nodes_before = report.nodes_after = mg.node_count()
    times.append(time.perf_counter())

    from lnfuse.passes import DEFAULT_PASSES

    ctx = PassContext(
        report=report, verify=verify, rmsnorm=rmsnorm, hoist=hoist, allow_transpose=allow_transpose
    )
    active = [
        p for p in (cls() for cls in (passes if passes is not None else DEFAULT_PASSES)) if p.enabled(ctx)
    ]
    ctx.emit_ok = _emit_plan(proto, report.source, old, target_opset, active)
    if verify:
        from lnfuse.verify import Prover

        ctx.prover = Prover(old or 17)
    modified = _run_passes(mg, ctx, active)
    times.append(time.perf_counter())
    if not modified and (target_opset is None or (old or 0) >= target_opset):
        report.timings.update(_phases(times, ("load", "import_", "match")))
        return OptimizeResult(model=proto, report=report, changed=False)
    del proto  # held by mg alone: a model this call loaded can then be freed once compacted
    return _finish(model, lazy, mg, report, target_opset, check_output, times)


def _load_checked(
    model: onnx.ModelProto | str | os.PathLike, lazy: bool, allow_invalid: bool
) -> tuple[onnx.ModelProto, Report]:
    """The model and a report started for it; InputError for a model lnfuse cannot work on."""
    from lnfuse import io as lio

    proto, source = _load(model, lazy)
    report = Report(source=source)
    old = opset_mod.default_opset(proto)
    report.opset_before = report.opset_after = old
    if old is not None and (old < MIN_SUPPORTED_OPSET or old > opset_mod.max_supported_opset()):
        raise InputError(
            f"{source}: unsupported opset {old} (supported: {MIN_SUPPORTED_OPSET}..{opset_mod.max_supported_opset()})"
        )
    if not proto.HasField("graph"):
        raise InputError(f"{source}: model has no graph")
    # The checker also proves SSA and topological order; only when it fails (or is waived) does
    # the slower structural validation run, for its clearer message (cycle, duplicate name).
    problem = _light_check(proto)
    if problem is not None or allow_invalid:
        lio.validate_structure(proto)
    if problem is not None and not allow_invalid:
        raise InputError(
            f"{source}: the model fails onnx.checker: {problem} (pass --allow-invalid to optimize it anyway)"
        )
    return proto, report


def _emit_plan(
    proto: onnx.ModelProto, source: str, old: int | None, target_opset: int | None, active: list
) -> dict[str, str | None]:
    """Per op the enabled passes may emit: None when the model has (or can exactly be raised to)
    the opset it needs, else why not. Decided before anything is rewritten."""
    base = max(old or 0, target_opset or 0)
    emit_ok: dict[str, str | None] = {}
    gates = (getattr(p, "emits", None) for p in active)
    for op, need in dict(g for g in gates if g is not None).items():
        want = max(base, need)
        emit_ok[op] = None if (old is not None and old >= want) else opset_mod.plan(proto, want)
    if target_opset is not None and old is not None and target_opset > old:
        why = opset_mod.plan(proto, target_opset)
        if why is not None:
            raise InputError(f"{source}: cannot raise opset {old} -> {target_opset} exactly: {why}")
    return emit_ok


def _run_passes(mg: ModelGraph, ctx: PassContext, active: list) -> bool:
    """Run the passes in order; fill the report's pass list, timings, left-alone anchors, opset
    note and recurrent groups. True if a pass changed the model."""
    report = ctx.report
    modified = False
    anchors = anchors_mod.snapshot(mg)
    for p in active:
        report.passes.append(p.name)
        t_p = time.perf_counter()
        _mg, changed = p(mg, ctx)
        report.timings[f"pass:{p.name}"] = time.perf_counter() - t_p
        modified = modified or changed
    report.left_alone = anchors_mod.left_alone(anchors, report, ctx.anchor_notes)
    if ctx.prover is not None:
        report.proofs_run = ctx.prover.proofs_run  # type: ignore[attr-defined]
    for op, why in ctx.emit_ok.items():
        if why is not None and any(m.op == op for m in report.found_not_rewritten):
            report.opset_note = f"{op} needs opset {MIN_OPSET[op]}; not raised: {why}"
    report.groups = _groups(report)
    return modified


def _finish(
    model: onnx.ModelProto | str | os.PathLike,
    lazy: bool,
    mg: ModelGraph,
    report: Report,
    target_opset: int | None,
    check_output: bool,
    times: list[float],
) -> OptimizeResult:
    """Write the rewrites back, raise the opset, check the result (the input, unchanged, when
    anything fails)."""
    old = report.opset_before
    # A model this call loaded itself is nobody else's: its big weights move into the result
    # instead of being copied (see ModelGraph.export). A failure below re-reads the input.
    consume = not isinstance(model, onnx.ModelProto)
    kept = None if consume else mg.model  # the caller's model: export copies it, never writes it
    out = mg.export(consume=consume)
    mg.release()

    def original() -> onnx.ModelProto:
        """The input as it was (re-read from its file when the export was built in it)."""
        return _load(model, lazy)[0] if kept is None else kept

    need = max([MIN_OPSET.get(m.op, 0) for m in report.matches] + [target_opset or 0])
    if need and (old is None or old < need):
        why = opset_mod.raise_opset(out, need, frozenset(m.op for m in report.matches))
        if why is not None:  # plan() said yes; a disagreement here is a bug: stay safe
            report.opset_note = f"opset not raised ({why}); model left unchanged"
            report.matches.clear()
            return OptimizeResult(model=original(), report=report, changed=False)
    report.opset_after = opset_mod.default_opset(out)
    # The rewritten proto is freed here, before the check needs its memory.
    out = _compact(out, sum(len(m.nodes) for m in report.matches))
    times.append(time.perf_counter())
    if check_output:
        problem = _full_check(out)
        if problem is not None:
            before = original()
            if _full_check(before) is None:
                report.warnings.append(
                    f"internal error: the rewritten model failed onnx.checker ({problem}); model left unchanged"
                )
                report.matches.clear()
                report.opset_after = old
                return OptimizeResult(model=before, report=report, changed=False)
    report.nodes_after = sum(1 for _ in iter_nodes(out.graph))
    report.changed = True
    times.append(time.perf_counter())
    report.timings.update(_phases(times, ("load", "import_", "match", "export", "check")))
    return OptimizeResult(model=out, report=report, changed=True)


def _phases(times: list[float], names: tuple[str, ...]) -> dict[str, float]:
    """Durations between consecutive time stamps, by phase name."""
    return {name: b - a for name, a, b in zip(names, times, times[1:], strict=False)}


def _without_big_weights(model: onnx.ModelProto, limit: int = 1 << 20) -> onnx.ModelProto:
    """A copy for checking: main-graph initializers over ``limit`` bytes become graph inputs.

    Weights are never shape tensors, so the checker and shape inference see the same
    model; the copy costs kilobytes instead of a second copy of the weights.
    """
    out = onnx.ModelProto()
    copy_fields(out, model, {"graph"})
    g = model.graph
    copy_fields(out.graph, g, {"initializer"})
    for init in g.initializer:
        if tensor_nbytes(init) > limit or init.data_location == onnx.TensorProto.EXTERNAL:
            out.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
        else:
            out.graph.initializer.append(init)
    return out


def _full_check(model: onnx.ModelProto) -> str | None:
    """``onnx.checker.check_model(full_check=True)``, from a temporary file (the checker copies a
    model it is given in memory; see ``io.whole_model_problem``); big models are checked without
    their weights."""
    from lnfuse import io as lio

    if not _has_external(model):
        checked, problem = lio.whole_model_problem(model, INFER_LIMIT)
        if checked:
            return problem
    return lio.checker_problem(_without_big_weights(model))


def _compact(model: onnx.ModelProto, removed: int) -> onnx.ModelProto:
    """``model`` parsed anew from its bytes when ``removed`` (the nodes rewritten away) is large
    and its weights are small; else ``model`` itself.

    A model rewritten in place keeps the storage of every node it lost (protobuf does not give
    it back, about 460 bytes a node): the fused 110k-node chain holds 66 MiB where a fresh parse
    of the same model holds 29 MiB. The caller drops the old one, whose memory the output check
    then reuses.
    """
    if removed < COMPACT_NODES or _has_external(model):
        return model
    if sum(tensor_nbytes(t) for t in model.graph.initializer) > COMPACT_WEIGHTS:
        return model
    data = serialized_below(model, INFER_LIMIT)
    return model if data is None else onnx.ModelProto.FromString(data)


def _has_external(model: onnx.ModelProto) -> bool:
    """Main-graph weights left on disk (``lazy_external``): checked without them."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _light_check(model: onnx.ModelProto) -> str | None:
    """``onnx.checker`` without the full shape-inference pass (cheap on big models)."""
    data = None if _has_external(model) else serialized_below(model, INFER_LIMIT)
    try:
        onnx.checker.check_model(data if data is not None else _without_big_weights(model), full_check=False)
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        return lines[0][:300] if lines else type(err).__name__
    return None


def _groups(report: Report) -> list[Group]:
    """Group matches that share scale, bias and epsilon in one graph: per-time-step norms of a recurrence."""
    buckets: dict[tuple, list] = {}
    for m in report.matches:
        if m.scale is None:
            continue
        key = (m.graph, m.op, m.scale, m.bias, m.epsilon, m.normalized_shape)
        buckets.setdefault(key, []).append(m)
    shared = {k: v for k, v in buckets.items() if len(v) > 1}
    if not shared:
        return []
    # Steps = the common count; norms per step = how many distinct parameter sets share that count.
    by_graph: dict[tuple[str, int], list] = {}
    for (graph, *_), ms in shared.items():
        by_graph.setdefault((graph, len(ms)), []).append(ms)
    groups: list[Group] = []
    for (graph, steps), sets in by_graph.items():
        per_step = len(sets)
        kind = {3: "LN-LSTM-like", 2: "LN-GRU/RNN-like"}.get(per_step, "recurrent")
        outputs = tuple(m.output for ms in sets for m in ms)
        groups.append(
            Group(
                description=f"{kind} recurrence in {graph}: {per_step} LN(s) per step x T={steps} steps, gain/bias shared",
                count=per_step * steps,
                graph=graph,
                outputs=outputs,
            )
        )
    return groups
