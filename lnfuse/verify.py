"""Per-match numeric proof: run the matched subgraph and the fused op on tiny tensors.

Before a rewrite is kept, the match (as it was: its nodes, constants and, for a
16-bit island, the leading Cast) and the replacement (``LayerNormalization`` /
``RMSNormalization``, plus any Transposes or Cast) are exported as two small
standalone models and run on ONNX Runtime's CPU provider with graph
optimizations disabled, on seeded random inputs with the match's real dtype,
normalized shape and constants: one ordinary case (``normal(0.5, 1)``) and one
large-magnitude case. Outputs must agree within the tolerance of the narrowest float
type the match computes through (:func:`lnfuse.precision.proof_tolerance`: a match with an
fp16 round trip inside its statistics is held to fp16's, a pure fp32 match to fp32's). The only
disagreement tolerated is the original overflowing (inf/NaN, as a decomposed
fp16 layer norm does when ``|x - mean|`` passes ~256) where the fused op stays
finite. A match that disagrees is refused with the measured error.

Proofs are cached by the structure of the match (ops, attributes, wiring,
constant shapes, small constant values) and the fused parameters, so a model
with thousands of identical blocks runs one proof per distinct block.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from lnfuse import ir, shapes
from lnfuse.graph import ModelGraph, np_dtype
from lnfuse.matcher import Candidate
from lnfuse.opset import min_ir_version
from lnfuse.precision import FloatKind, narrowest, proof_tolerance
from lnfuse.rules import NormParams, NormRule
from lnfuse.symbolic import Flag

TP = onnx.TensorProto


class Prover:
    """Runs (and caches) proofs for one optimize call."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.cache: dict[tuple, str | None] = {}
        self.proofs_run = 0
        self._attrs_key = _AttrKeys()

    def prove(self, mg: ModelGraph, rule: NormRule, cand: Candidate, params: NormParams) -> str | None:
        """None when the fused op reproduces the match, else a one-line reason."""
        key = _signature(mg, cand, params, self._attrs_key)
        if key in self.cache:
            return self.cache[key]
        reason = ""
        for shape in _tiny_shapes(mg, rule, cand, params):
            try:
                reason = self._prove(mg, rule, cand, params, shape)
                break
            except Exception as err:  # a proof that cannot run is a refusal, never a crash
                reason = (
                    f"numeric proof could not run: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                )
        self.cache[key] = reason
        return reason

    def _prove(
        self, mg: ModelGraph, rule: NormRule, cand: Candidate, params: NormParams, shape: list[int]
    ) -> str | None:
        """Run the match and its replacement on ``shape``-sized inputs; None when they agree."""
        inp = rule.input_of(mg, cand, params)
        in_dt = mg.dtype(inp)
        out_dt = mg.dtype(params.extent.final)
        assert in_dt is not None and out_dt is not None
        nodes = [*params.extent.prefix, *cand.nodes, *params.extent.suffix]
        orig = _original_model(mg, cand, params, inp, nodes, shape, self.opset)
        x_f = ir.Variable("x", dtype=np_dtype(in_dt), shape=shape)
        y_f = ir.Variable("y", dtype=np_dtype(out_dt))
        counter = iter(range(1_000_000))
        namer: Callable[[str], str] = lambda base: f"{base}_{next(counter)}"  # noqa: E731
        fused = _model(rule.build(params, x_f, y_f, namer), x_f, y_f, max(self.opset, rule.min_opset))
        sess_a = _session(orig)
        sess_b = _session(fused)
        self.proofs_run += 1
        narrow = _narrowest(mg, nodes, in_dt, out_dt, params)
        return _compare(sess_a, sess_b, np_dtype(in_dt), shape, narrow, params.flags)


def _original_model(
    mg: ModelGraph,
    cand: Candidate,
    params: NormParams,
    inp: ir.Tensor,
    nodes: list[ir.Node],
    shape: list[int],
    opset: int,
) -> onnx.ModelProto:
    """The match as it is (its nodes, constants and shape-derived inputs for ``shape``) as a
    standalone model from ``x`` to the match's output."""
    names: dict[int, ir.Tensor] = {}
    x_in = ir.Variable("x", dtype=np_dtype(mg.dtype(inp) or 0), shape=shape)
    names[id(inp)] = x_in
    inside = {id(n) for n in nodes}
    known, refs = _binding(mg, inp, shape)

    def tensor(t: ir.Tensor) -> ir.Tensor:
        if id(t) not in names:
            made_here = bool(t.inputs) and id(t.inputs[0]) in inside
            val = None if made_here else mg.const_value(t)
            if val is None and not made_here and t is not inp and id(t) not in cand.valued:
                # A shape-derived input (a Reshape target, Expand(1, rows)): its value for the
                # proof's input shape.
                val = shapes.evaluate(mg, t, known, refs)
            if val is not None and t is not cand.x:
                names[id(t)] = ir.Constant(f"c{len(names)}", np.array(val))
            else:
                names[id(t)] = ir.Variable(f"t{len(names)}")
        return names[id(t)]

    orig_nodes = [n.clone([tensor(t) for t in n.inputs], [tensor(t) for t in n.outputs]) for n in nodes]
    y_orig = names[id(params.extent.final)]
    y_orig.dtype = mg.dtype(params.extent.final)
    return _model(orig_nodes, x_in, y_orig, opset)


def _compare(
    sess_a: object,
    sess_b: object,
    in_np: np.dtype,
    shape: list[int],
    narrow: FloatKind,
    flags: frozenset[str],
) -> str | None:
    """Run both sessions on an ordinary and a large-magnitude seeded input; None when the outputs
    agree within the tolerance of ``narrow`` (the original alone overflowing is tolerated)."""
    rtol, atol, large_tol = proof_tolerance([narrow])
    if Flag.ONE_PASS in flags or Flag.UNBIASED in flags:
        rtol, atol = rtol * 10, atol * 10
    rng = np.random.default_rng(1234)
    cases = [("normal", rng.normal(0.5, 1.0, size=shape))]
    big = 300.0 if narrow.bits <= FloatKind.FLOAT16.bits else 1000.0  # 16-bit inside: fp16's range
    offset = 0.0 if Flag.ONE_PASS in flags else 3.0 * big
    cases.append(("large-magnitude", rng.normal(offset, big, size=shape)))
    for label, data in cases:
        feed = {"x": data.astype(in_np)}
        (a,) = sess_a.run(None, feed, _quiet_run())  # type: ignore[attr-defined]
        (b,) = sess_b.run(None, feed, _quiet_run())  # type: ignore[attr-defined]
        if a.shape != b.shape:
            return f"numeric proof failed ({label}): shape {list(b.shape)} != {list(a.shape)}"
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
        if np.any(fin_a & ~fin_b):
            return f"numeric proof failed ({label}): fused output is not finite where the original is"
        both = fin_a & fin_b
        if not np.any(both):
            continue
        err = np.abs(a64[both] - b64[both])
        scale = max(float(np.max(np.abs(a64[both]))), 1.0)
        tol = atol + rtol * scale
        if label == "large-magnitude":
            # Offset inputs amplify the original's own rounding (Keras' x*s - mean*s, one-pass
            # variance); this case is there to catch gross errors (sign, eps, overflow).
            tol = max(tol, large_tol * scale)
        if float(np.max(err)) > tol:
            return f"numeric proof failed ({label}): max abs error {float(np.max(err)):.3g} (tolerance {tol:.3g})"
    return None


def _quiet_run():  # type: ignore[no-untyped-def]
    """Run options that keep ONNX Runtime's own error log off stderr (a failed proof is a refusal)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _binding(
    mg: ModelGraph, inp: ir.Tensor, shape: list[int]
) -> tuple[shapes.Known, dict[shapes.DimRef, int]]:
    """The proof input's shape, and the run-time dims of the real input bound to its sizes."""
    known = {id(inp): [(int(d), ()) for d in shape]}
    refs: dict[shapes.DimRef, int] = {}
    real = mg.shape(inp)
    if real is not None and len(real) == len(shape):
        for i, d in enumerate(real):
            if not isinstance(d, int):
                refs[shapes.canonical(mg, inp, i)] = int(shape[i])
    return known, refs


def _narrowest(
    mg: ModelGraph, nodes: list[ir.Node], in_dt: int, out_dt: int, params: NormParams
) -> FloatKind:
    """The narrowest float type among the match's input, output, fused dtype and every tensor
    its nodes compute (a tensor of unknown dtype says nothing; float32 when none is known)."""
    kinds = [FloatKind.of(in_dt), FloatKind.of(out_dt), FloatKind.of(params.dtype)]
    for n in nodes:
        kinds += [FloatKind.of(mg.dtype(t) or 0) for t in n.outputs]
    return narrowest(kinds) or FloatKind.FLOAT32


def _tiny_shapes(mg: ModelGraph, rule: NormRule, cand: Candidate, params: NormParams) -> list[list[int]]:
    """The proof's input shape, and when the real input's rank is unknown also ranks one and two
    higher (the exporter's shape-derived inputs, e.g. an Expand over the rows, may assume one): the
    first shape whose models run decides."""
    shape = _tiny_shape(mg, cand, params)
    if cand.rank is not None or mg.shape(rule.input_of(mg, cand, params)) is not None:
        return [shape]
    return [shape, [3, *shape], [3, 2, *shape]]


def _tiny_shape(mg: ModelGraph, cand: Candidate, params: NormParams) -> list[int]:
    source = params.extent.source
    exact = (
        Flag.UNFLATTENED in params.flags
        or params.perm is not None
        or cand.rank is None
        or any(n.op == "Reshape" for n in cand.nodes)  # constant target shapes need the real dims
    )
    shape = mg.shape(source) if exact else None
    if shape is not None and all(not isinstance(d, int) or d > 0 for d in shape):
        # Static dims as they are (constant and shape-derived targets need them), dynamic ones small.
        dims = [int(d) if isinstance(d, int) else (3 if i == 0 else 2) for i, d in enumerate(shape)]
        norm_axes = range(-len(params.normalized_shape), 0) if Flag.UNFLATTENED in params.flags else cand.axes
        if params.perm is None and len(norm_axes) == len(params.normalized_shape) <= len(dims):
            for a, d in zip(norm_axes, params.normalized_shape, strict=False):
                dims[a] = int(d)
        if int(np.prod(dims)) <= 1 << 16:
            return dims
    consts = [mg.const_value(c) for c in cand.const_inputs]
    max_const_rank = max((v.ndim for v in consts if v is not None), default=0)
    axes = tuple(range(-len(params.normalized_shape), 0)) if Flag.UNFLATTENED in params.flags else cand.axes
    if shape is not None:
        rank = len(shape)
    elif cand.rank is not None:
        rank = cand.rank
    else:
        rank = max(len(axes) + 1, max_const_rank)
    dims = [3 if i == 0 else 2 for i in range(rank)]
    for a, d in zip(axes, params.normalized_shape, strict=False):
        dims[rank + a] = int(d)
    return dims


def _model(nodes: list[ir.Node], x: ir.Tensor, y: ir.Tensor, opset: int) -> onnx.ModelProto:
    return ir.standalone_model(nodes, [x], [y], opset, max(7, min_ir_version(opset)))


def _session(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """A quiet single-thread CPU session at ORT_DISABLE_ALL (the runtime's own fusion must not help)."""
    from lnfuse.runtime import ProviderChoice, make_session

    cpu = ProviderChoice("cpu", ("CPUExecutionProvider",), "per-match proof")
    return make_session(model, cpu, "disable", threads=1)


def _attrs_key(n: ir.Node) -> tuple:
    if not n.attrs:
        return ()
    return tuple(
        sorted((k, v if isinstance(v, (int, float, str, bytes)) else repr(v)) for k, v in n.attrs.items())
    )


class _AttrKeys:
    """``_attrs_key`` of each node, worked out once per shared read-only attribute set (the nodes of
    one graph with equal plain attributes share one, :class:`lnfuse.ir.Source`)."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: dict[int, tuple[object, tuple]] = {}  # id(attrs) -> (attrs, key): held, so ids stay

    def __call__(self, n: ir.Node) -> tuple:
        attrs = n.attrs
        if not attrs:
            return ()
        if not ir.shared_attrs(attrs):
            return _attrs_key(n)
        hit = self.keys.get(id(attrs))
        if hit is None:
            hit = self.keys[id(attrs)] = (attrs, _attrs_key(n))
        return hit[1]


def _signature(
    mg: ModelGraph, cand: Candidate, params: NormParams, attrs_key: Callable[[ir.Node], tuple] = _attrs_key
) -> tuple:
    """Structure of the match and the fused parameters (not the values of large constants)."""
    index = {n: i for i, n in enumerate(cand.nodes)}
    x = cand.x
    parts: list[object] = [
        (params.op, params.epsilon, params.axis, params.stash_type, params.normalized_shape),
        (
            params.dtype,
            params.read_source,
            params.out_cast,
            params.pre_cast,
            params.perm,
            tuple(sorted(params.flags)),
        ),
        tuple((n.op, attrs_key(n)) for n in (*params.extent.prefix, *params.extent.suffix)),
        (mg.dtype(x), mg.dtype(cand.output), cand.axes, params.scale.shape, params.bias is None),
    ]
    append = parts.append
    for n in cand.nodes:
        append((n.op, n.domain, attrs_key(n)))
        for t in n.inputs:
            if t is x:
                append("X")
                continue
            i = index.get(t.inputs[0]) if t.inputs else None
            if i is not None:
                outs = t.inputs[0].outputs
                k = 0 if outs[0] is t else next((k for k, o in enumerate(outs) if o is t), 0)
                append(("n", i, k))
                continue
            val = mg.const_value(t)
            if val is None:
                append("?")
            else:
                small = np.ascontiguousarray(val).tobytes() if val.size <= 16 else b""
                append(("c", val.dtype.str, val.shape, small))
    return tuple(parts)
