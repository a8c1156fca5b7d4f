"""One precision policy for the per-match proof, ``lnfuse check`` and ``optimize --validate``.

Where the original rounds through a narrower float type than its output (a float32 graph
whose LayerNorm statistics or MatMuls run in float16, as ``torch.autocast`` and
onnxconverter-common's ``keep_io_types`` write them), the fused ``LayerNormalization``
computes its statistics in float32 and drops that rounding: it is the more accurate
computation (measured against a float64 reference, see README "Precision policy"). So every
comparison uses the tolerance of the *narrowest float type the original computes through on
the path from the graph inputs to that output*, not only the output's dtype. Constants are
not on that path (float16 weights cast to float32 leave a float32 model float32), and the
candidate never chooses: a candidate that computes in float16 where the original did not is
still held to float32's tolerance.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto

__all__ = [
    "CHECK_TOLERANCES",
    "Basis",
    "FloatKind",
    "Tolerance",
    "narrowest",
    "narrowest_on_paths",
    "output_tolerances",
]


class FloatKind(enum.Enum):
    """Float element types, by ONNX type number; ``bits`` is the significand width."""

    BFLOAT16 = TensorProto.BFLOAT16
    FLOAT16 = TensorProto.FLOAT16
    FLOAT32 = TensorProto.FLOAT
    FLOAT64 = TensorProto.DOUBLE

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def dtype_name(self) -> str:
        """numpy-style name: float16, bfloat16, float32, float64."""
        return self.name.lower()

    @classmethod
    def of(cls, elem_type: Any) -> FloatKind | None:
        """The kind of an ONNX element type, numpy dtype or dtype name; None for non-floats."""
        if isinstance(elem_type, int):
            return _BY_ELEM.get(elem_type)
        name = getattr(elem_type, "name", None) or str(elem_type)
        return _BY_NAME.get(name)


_BITS = {FloatKind.BFLOAT16: 8, FloatKind.FLOAT16: 11, FloatKind.FLOAT32: 24, FloatKind.FLOAT64: 53}
_BY_ELEM = {k.value: k for k in FloatKind}
_BY_NAME = {k.dtype_name: k for k in FloatKind}

#: (rtol, atol) of ``lnfuse check`` by float type (README "Precision policy"):
#: * float32: ~80 ulp at magnitude 1, so re-association inside a fused kernel passes while a
#:   wrong epsilon, axis, sign or affine parameter does not.
#: * float16 (11 significant bits): 1e-2 + 1e-2*|ref| is roughly 10-20 ulp at magnitude 1-3;
#:   a decomposed fp16 chain and a fused kernel with an fp32 stash differ by a few ulp.
#: * bfloat16 (8 significant bits): 1e-2 would be about one ulp, so 2e-2 (about 5 ulp).
#: * float64: 1e-7 (LayerNormalization's epsilon attribute is a float32, so a fused float64
#:   norm whose epsilon is not a float32 value differs by up to ~3e-8 relative).
CHECK_TOLERANCES: dict[FloatKind, tuple[float, float]] = {
    FloatKind.FLOAT64: (1e-7, 1e-7),
    FloatKind.FLOAT32: (1e-5, 1e-5),
    FloatKind.FLOAT16: (1e-2, 1e-2),
    FloatKind.BFLOAT16: (2e-2, 2e-2),
}

#: (rtol, atol) of the per-match proof (tiny tensors, one ordinary case) and its tolerance
#: relative to the output's magnitude in the large-magnitude case, by float type.
PROOF_TOLERANCES: dict[FloatKind, tuple[float, float]] = {
    FloatKind.FLOAT64: (1e-7, 1e-7),
    FloatKind.FLOAT32: (1e-4, 1e-4),
    FloatKind.FLOAT16: (2e-2, 2e-2),
    FloatKind.BFLOAT16: (4e-2, 4e-2),
}
PROOF_LARGE_TOLERANCES: dict[FloatKind, float] = {
    FloatKind.FLOAT64: 1e-6,
    FloatKind.FLOAT32: 1e-3,
    FloatKind.FLOAT16: 5e-2,
    FloatKind.BFLOAT16: 1e-1,
}


def narrowest(kinds: Iterable[FloatKind | None]) -> FloatKind | None:
    """The kind with the fewest significand bits (None when there is no float kind)."""
    found = [k for k in kinds if k is not None]
    return min(found, key=lambda k: k.bits) if found else None


class Basis(enum.Enum):
    """Why a tolerance was chosen."""

    OUTPUT = "output dtype"  # the original computes at least as wide as the output
    INSIDE = "narrower type inside"  # the original rounds through a narrower float type
    GIVEN = "given"  # --rtol / --atol
    EXACT = "exact"  # integer, bool, string outputs


@dataclass(frozen=True)
class Tolerance:
    """The tolerance one output is compared with, and why."""

    output: str
    dtype: str  # the output's dtype name ("" if unknown)
    rtol: float
    atol: float
    basis: Basis
    through: str = ""  # the narrowest float type on the path, when narrower than the output
    at: str = ""  # the first tensor of that type on the path

    def describe(self) -> str:
        """e.g. ``float16 inside (first at 'c'): rtol=0.01 atol=0.01 (output float32)``."""
        tol = f"rtol={self.rtol:g} atol={self.atol:g}"
        if self.basis is Basis.INSIDE:
            where = f" (first at '{self.at}')" if self.at else ""
            return f"{self.through} inside{where}: {tol} (output {self.dtype})"
        if self.basis is Basis.GIVEN:
            return f"given: {tol}"
        if self.basis is Basis.EXACT:
            return f"exact match ({self.dtype or 'non-float'})"
        return f"{self.dtype}: {tol}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "basis": self.basis.name.lower(),
            "through": self.through or None,
            "at": self.at or None,
            "why": self.describe(),
        }


# --------------------------------------------------------------------------- paths

_Found = tuple[FloatKind, str]  # (kind, first tensor of that kind)


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names the subgraphs of ``node`` read (names they define are left out)."""
    reads: set[str] = set()
    for graph in _subgraphs(node):
        defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
        for inner in graph.node:
            defined.update(inner.output)
        for inner in graph.node:
            reads.update(n for n in inner.input if n and n not in defined)
            reads.update(n for n in subgraph_reads(inner) if n not in defined)
    return reads


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
    return graphs


def _cast_kind(node: onnx.NodeProto) -> FloatKind | None:
    if node.op_type != "Cast":
        return None
    return next((FloatKind.of(int(a.i)) for a in node.attribute if a.name == "to"), None)


def _declared(graph: onnx.GraphProto) -> dict[str, int]:
    types = {i.name: int(i.data_type) for i in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type:
            types[value.name] = int(value.type.tensor_type.elem_type)
    return types


def _inner_kinds(node: onnx.NodeProto) -> list[_Found]:
    """Float kinds computed inside the subgraphs of ``node`` (declared/inferred types, Casts)."""
    found: list[_Found] = []
    for graph in _subgraphs(node):
        types = _declared(graph)
        for inner in graph.node:
            for out in inner.output:
                kind = FloatKind.of(types.get(out, 0)) or _cast_kind(inner)
                if kind is not None:
                    found.append((kind, out))
            found += _inner_kinds(inner)
    return found


def _pick(found: Iterable[_Found | None]) -> _Found | None:
    best: _Found | None = None
    for item in found:
        if item is not None and (best is None or item[0].bits < best[0].bits):
            best = item
    return best


def narrowest_on_paths(model: onnx.ModelProto) -> dict[str, _Found | None]:
    """Per graph output: the narrowest float kind (and where first met) among the tensors the
    original computes from its graph inputs on the way to that output (subgraphs included).

    Constants (initializers, Constant nodes and what is computed from them alone) are not on a
    path. Types come from shape inference, else from the model's declarations and Casts.
    """
    graph = model.graph
    with contextlib.suppress(Exception):  # custom ops or a > 2 GiB proto: keep what is declared
        graph = onnx.shape_inference.infer_shapes(model).graph
    types = _declared(graph)
    inits = {i.name for i in graph.initializer}
    live: dict[str, _Found | None] = {}
    for inp in graph.input:
        if inp.name not in inits:
            kind = FloatKind.of(types.get(inp.name, 0))
            live[inp.name] = (kind, inp.name) if kind is not None else None
    for node in graph.node:
        reads = [n for n in node.input if n in live] + [n for n in subgraph_reads(node) if n in live]
        if not reads:
            continue
        upstream = [live[n] for n in reads]
        inner = _inner_kinds(node) if node.attribute else []
        for out in node.output:
            if out:
                kind = FloatKind.of(types.get(out, 0)) or _cast_kind(node)
                own = (kind, out) if kind is not None else None
                live[out] = _pick([*upstream, own, *inner])
    return {o.name: live.get(o.name) for o in graph.output}


def narrowest_inside(model: onnx.ModelProto) -> FloatKind | None:
    """The narrowest float kind any output of ``model`` is computed through."""
    return narrowest(f[0] for f in narrowest_on_paths(model).values() if f is not None)


def output_tolerances(
    model: onnx.ModelProto, rtol: float | None = None, atol: float | None = None
) -> dict[str, Tolerance]:
    """The tolerance of every graph output of the original ``model`` (see module doc).

    Explicit ``rtol``/``atol`` replace the policy's values (the other one stays).
    """
    paths = narrowest_on_paths(model)
    result: dict[str, Tolerance] = {}
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type if out.type.WhichOneof("value") == "tensor_type" else 0
        kind = FloatKind.of(int(elem))
        if kind is None:
            name = _elem_name(int(elem))
            result[out.name] = Tolerance(out.name, name, 0.0, 0.0, Basis.EXACT)
            continue
        inside = paths.get(out.name)
        tol = Tolerance(out.name, kind.dtype_name, *CHECK_TOLERANCES[kind], Basis.OUTPUT)
        if inside is not None and inside[0].bits < kind.bits:
            r, a = CHECK_TOLERANCES[inside[0]]
            tol = Tolerance(out.name, kind.dtype_name, r, a, Basis.INSIDE, inside[0].dtype_name, inside[1])
        if rtol is not None or atol is not None:
            tol = Tolerance(
                out.name,
                kind.dtype_name,
                tol.rtol if rtol is None else float(rtol),
                tol.atol if atol is None else float(atol),
                Basis.GIVEN,
            )
        result[out.name] = tol
    return result


def _elem_name(elem: int) -> str:
    if not elem:
        return ""
    with contextlib.suppress(Exception):
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return onnx.TensorProto.DataType.Name(elem).lower()


def proof_tolerance(kinds: Iterable[FloatKind | None]) -> tuple[float, float, float]:
    """(rtol, atol, large-magnitude relative tol) of the per-match proof: the narrowest of
    ``kinds`` (the match's input, output, fused dtype and every tensor the match computes)."""
    kind = narrowest(kinds) or FloatKind.FLOAT32
    return (*PROOF_TOLERANCES[kind], PROOF_LARGE_TOLERANCES[kind])


def tolerance_map(tolerances: Mapping[str, Tolerance]) -> list[dict[str, Any]]:
    """JSON form of :func:`output_tolerances`, in output order."""
    return [t.to_dict() for t in tolerances.values()]


# --------------------------------------------------------------------------- optimize report


class Rounding(enum.Enum):
    """A narrower rounding inside a matched norm that the fused op no longer does (report flag)."""

    FLOAT16 = "fp16_rounding_removed"
    BFLOAT16 = "bf16_rounding_removed"


_ROUNDING = {FloatKind.FLOAT16: Rounding.FLOAT16, FloatKind.BFLOAT16: Rounding.BFLOAT16}


def removed_rounding(nodes: Iterable[Any], dtype_of: Any, final: Any) -> tuple[Rounding, str] | None:
    """The first narrowing Cast to a 16-bit float among the matched ``nodes`` that is not the
    match's last step (its output is not ``final``): the original rounds through that type
    inside the norm; the fused op computes the norm in one piece and rounds once, at its output.

    ``nodes`` are onnx-graphsurgeon nodes, ``dtype_of(tensor)`` their ONNX element type.
    Returns the flag and the Cast's output name.
    """
    for node in nodes:
        if node.op != "Cast" or node.outputs[0] is final:
            continue
        to = FloatKind.of(int(node.attrs.get("to", 0)))
        src = FloatKind.of(dtype_of(node.inputs[0]) or 0)
        if to in _ROUNDING and src is not None and to.bits < src.bits:
            return _ROUNDING[to], node.outputs[0].name
    return None
