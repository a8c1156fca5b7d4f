"""Raise a model's default-domain opset only when every op keeps its meaning.

``LayerNormalization`` exists in the default domain from opset 17 and
``RMSNormalization`` from opset 23. To emit one into an older model, the
model's ``""``/``ai.onnx`` opset import must be raised, and that is only safe
when every default-domain node (subgraphs and model-local functions included)
means the same at the new opset. For each node we compare the schema version in
force at the old and the new opset:

* same version: nothing to do;
* a known exact conversion: applied (``ReduceSum`` / ``Squeeze`` / ``Unsqueeze``
  axes and ``Split`` sizes move from attribute to input at 13, an equal ``Split`` names its
  ``num_outputs`` at 18; ``Dropout``'s ``ratio`` attribute, meaningless in inference, is
  dropped at 12);
* a known same-meaning change: accepted with a condition where one is needed
  (``Softmax`` / ``LogSoftmax`` / ``Hardmax`` only over the last axis, since
  opset 13 changed how other axes are read; ``BatchNormalization`` with a
  single output; ``Resize`` without ``tf_half_pixel_for_nn``; ``MaxPool`` /
  ``AveragePool`` past opset 22 without ``ceil_mode``, since 22 drops a last window that
  would start in the right padding);
* any other change is accepted only when the new schema keeps every attribute
  of the old one and its inputs (types widened, attributes added with defaults
  that keep the old behaviour: the opset 12-16 releases; optional inputs added
  after the old ones, as Pad's ``axes`` at 18), and only from opset 11 upwards;
  below 11 (``Slice``, ``Pad``, ``Clip``, ``TopK``, ``Resize``... changed
  meaning) only identical schemas pass.

Anything else leaves the model unchanged, with the reason. ``RoiAlign`` (its
default coordinate mode changed at 16) and ``Upsample`` (deprecated) always refuse.
The IR version is raised to the minimum the new opset needs, never lowered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import onnx
from onnx import defs, helper

from lnfuse.protos import inferred_or_same, iter_graphs, iter_nodes

DEFAULT_DOMAINS = ("", "ai.onnx")
_NEVER = frozenset({"RoiAlign", "Upsample", "GroupNormalization"})


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def max_supported_opset() -> int:
    return int(defs.onnx_opset_version())


def min_ir_version(opset: int) -> int:
    best = None
    for entry in helper.VERSION_TABLE:
        ir, op = entry[1], entry[2]
        if op >= opset and (best is None or ir < best):
            best = ir
    return int(best) if best is not None else int(onnx.IR_VERSION)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def _schema_version(op: str, opset: int) -> int | None:
    try:
        return int(defs.get_schema(op, opset, "").since_version)
    except Exception:
        return None


def _structurally_compatible(op: str, old: int, new: int) -> bool:
    """The new schema keeps every attribute and input of the old one, in place; inputs it adds
    are optional ones after them (Pad's ``axes`` at 18: absent, every axis is padded, as before)."""
    a = defs.get_schema(op, old, "")
    b = defs.get_schema(op, new, "")
    if not set(a.attributes) <= set(b.attributes):
        return False
    if len(a.inputs) > len(b.inputs):
        return False
    optional = defs.OpSchema.FormalParameterOption.Optional
    if any(y.option != optional for y in b.inputs[len(a.inputs) :]):
        return False
    return all(x.name == y.name for x, y in zip(a.inputs, b.inputs, strict=False))


Converter = Callable[[onnx.NodeProto, "_Ctx"], None]


class _Ctx:
    def __init__(self, graph_inits: list[onnx.TensorProto], ranks: dict[str, int]) -> None:
        self.new_constants = graph_inits
        self.ranks = ranks
        self.counter = 0
        self.expand: set[str] = set()  # outputs of Softmax-family nodes to rewrite in 2-D form


_SOFTMAX_FAMILY = ("Softmax", "LogSoftmax", "Hardmax")
_POOLS = ("MaxPool", "AveragePool")  # opset 22: a ceil_mode window may no longer start in the padding
# Ops whose change is judged by _condition (not by their signature).
_CONDITIONAL = (*_SOFTMAX_FAMILY, "BatchNormalization", "Resize")


def _expand_softmax(graph: onnx.GraphProto, outputs: set[str]) -> None:
    """Replace each opset<13 ``Softmax(x, axis=a)`` whose output is in ``outputs`` by
    ``Reshape(Softmax(Flatten(x, a), axis=-1), Shape(x))``: the old definition, spelled in ops
    whose meaning does not change (exact for any rank)."""
    # Bodies before the graphs that hold them: rebuilding a graph's node list copies its nodes,
    # so a body edited after its parent was rebuilt would be a detached copy's.
    for g in reversed(list(iter_graphs(graph))):
        new_nodes: list[onnx.NodeProto] = []
        changed = False
        for node in g.node:
            if (
                node.op_type in _SOFTMAX_FAMILY
                and node.domain in DEFAULT_DOMAINS
                and node.output[0] in outputs
            ):
                a = _attr(node, "axis")
                axis = int(a.i) if a is not None else 1
                x, y = node.input[0], node.output[0]
                flat, norm, shape = f"{y}__lnfuse_2d", f"{y}__lnfuse_rows", f"{y}__lnfuse_shape"
                new_nodes += [
                    helper.make_node("Flatten", [x], [flat], axis=axis, name=f"{node.name}/lnfuse_flatten"),
                    helper.make_node(node.op_type, [flat], [norm], axis=-1, name=node.name),
                    helper.make_node("Shape", [x], [shape], name=f"{node.name}/lnfuse_shape"),
                    helper.make_node(
                        "Reshape", [norm, shape], [y], allowzero=1, name=f"{node.name}/lnfuse_reshape"
                    ),
                ]
                changed = True
            else:
                new_nodes.append(node)
        if changed:
            del g.node[:]
            g.node.extend(new_nodes)


def _move_ints_attr_to_input(name: str, position: int) -> Converter:
    def convert(node: onnx.NodeProto, ctx: _Ctx) -> None:
        attr = _attr(node, name)
        if attr is None:
            return
        values = list(attr.ints)
        node.attribute.remove(attr)
        ctx.counter += 1
        tname = f"{node.output[0]}__lnfuse_{name}_{ctx.counter}"  # If branches may reuse output names
        ctx.new_constants.append(helper.make_tensor(tname, onnx.TensorProto.INT64, [len(values)], values))
        while len(node.input) < position:
            node.input.append("")
        if len(node.input) == position:
            node.input.append(tname)
        else:
            node.input[position] = tname

    return convert


def _drop_attr(name: str) -> Converter:
    def convert(node: onnx.NodeProto, ctx: _Ctx) -> None:
        attr = _attr(node, name)
        if attr is not None:
            node.attribute.remove(attr)

    return convert


def _rename_gridsample_mode(node: onnx.NodeProto, ctx: _Ctx) -> None:
    attr = _attr(node, "mode")
    renamed = {b"bilinear": b"linear", b"bicubic": b"cubic"}
    if attr is None:
        node.attribute.append(helper.make_attribute("mode", "linear"))  # the old default was bilinear
    elif attr.s in renamed:
        attr.s = renamed[attr.s]


def _split_count(node: onnx.NodeProto, ctx: _Ctx) -> None:
    """Split-18 needs ``split`` sizes or ``num_outputs``: an equal split names its output count."""
    node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))


def _equal_split(node: onnx.NodeProto) -> bool:
    return (len(node.input) < 2 or not node.input[1]) and _attr(node, "split") is None


def _always(node: onnx.NodeProto) -> bool:
    return True


class _Conversion(NamedTuple):
    """An exact conversion an op needs from opset ``since`` on, for the nodes it ``applies`` to."""

    since: int
    convert: Converter
    applies: Callable[[onnx.NodeProto], bool] = _always


# op -> the exact conversions it needs, in the order they apply.
_CONVERT_AT: dict[str, tuple[_Conversion, ...]] = {
    "GridSample": (_Conversion(20, _rename_gridsample_mode),),
    "ReduceSum": (_Conversion(13, _move_ints_attr_to_input("axes", 1)),),
    "Squeeze": (_Conversion(13, _move_ints_attr_to_input("axes", 1)),),
    "Unsqueeze": (_Conversion(13, _move_ints_attr_to_input("axes", 1)),),
    "Split": (
        _Conversion(13, _move_ints_attr_to_input("split", 1)),
        _Conversion(18, _split_count, _equal_split),
    ),
    "Dropout": (_Conversion(12, _drop_attr("ratio")),),
}
for _op in (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
):
    _CONVERT_AT[_op] = (_Conversion(18, _move_ints_attr_to_input("axes", 1)),)


def _condition(node: onnx.NodeProto, old: int, new_schema: int, ctx: _Ctx) -> str | None:
    """None if this op's change between versions does not affect ``node`` (``new_schema``: the
    schema version it moves to), else why it does."""
    op = node.op_type
    if op in _POOLS and new_schema >= 22 and old < 22:
        attr = _attr(node, "ceil_mode")
        if attr is not None and attr.i:
            return f"{op} with ceil_mode=1 changed at opset 22 (windows that start in the right padding are dropped)"
        return None
    if op in _SOFTMAX_FAMILY and old < 13:
        attr = _attr(node, "axis")
        axis = int(attr.i) if attr is not None else 1
        if axis == -1:
            return None
        rank = ctx.ranks.get(node.input[0])
        if rank is not None and axis in (rank - 1, -1):
            return None
        return f"{op} over axis {axis} changed meaning at opset 13 (input rank {rank if rank else 'unknown'})"
    if op == "BatchNormalization":
        if sum(1 for o in node.output if o) == 1:
            return None
        return "BatchNormalization with training outputs changed at opset 14"
    if op == "Resize":
        attr = _attr(node, "coordinate_transformation_mode")
        if attr is not None and attr.s == b"tf_half_pixel_for_nn":
            return "Resize coordinate mode tf_half_pixel_for_nn was removed at opset 13"
        return None
    return None


def plan(model: onnx.ModelProto, target: int) -> str | None:
    """None when raising the default opset to ``target`` is exact, else the reason it is not."""
    return _upgrade(model, target, apply=False)


def raise_opset(model: onnx.ModelProto, target: int, new_ops: frozenset[str] = frozenset()) -> str | None:
    """Raise ``model`` (in place) to ``target``; returns the reason and changes nothing if not exact.

    ``new_ops`` are op types the caller just emitted for the new opset (they need no check).
    """
    reason = _upgrade(model, target, apply=False, new_ops=new_ops)
    if reason is not None:
        return reason
    _upgrade(model, target, apply=True, new_ops=new_ops)
    return None


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    ranks: dict[str, int] = {}
    inferred = inferred_or_same(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _upgrade(
    model: onnx.ModelProto, target: int, *, apply: bool, new_ops: frozenset[str] = frozenset()
) -> str | None:
    old = default_opset(model)
    if old is None or old >= target:
        if apply and old is None:
            model.opset_import.append(helper.make_opsetid("", target))
        return None
    if target > max_supported_opset():
        return f"opset {target} is newer than this onnx package supports ({max_supported_opset()})"
    needs_ranks = any(
        n.op_type in _SOFTMAX_FAMILY and (n.domain in DEFAULT_DOMAINS) for n in iter_nodes(model.graph)
    )
    ctx = _Ctx([], _ranks(model) if needs_ranks and old < 13 else {})
    # Main graph (with subgraphs), then each model-local function with its own default opset.
    units: list[tuple[Iterator[onnx.NodeProto], int, str]] = [(iter_nodes(model.graph), old, "graph")]
    for fn in model.functions:
        fold = next((int(i.version) for i in fn.opset_import if i.domain in DEFAULT_DOMAINS), None)
        if fold is not None and fold < target:
            units.append((iter(fn.node), fold, f"function {fn.name}"))
    for nodes, from_v, where in units:
        for node in nodes:
            if node.domain not in DEFAULT_DOMAINS:
                continue
            op = node.op_type
            if op in new_ops:
                continue
            a = _schema_version(op, from_v)
            b = _schema_version(op, target)
            if a is None:
                return f"{op} (in {where}) is not a known ONNX op at opset {from_v}"
            if b is None:
                return f"{op} (in {where}) no longer exists at opset {target}"
            if a == b:
                continue
            if op in _NEVER:
                return f"{op} changes meaning between opset {from_v} and {target}"
            # Which apply is decided before any runs (an opset-11 Split's sizes only move at 13).
            steps = [c.convert for c in _CONVERT_AT.get(op, ()) if a < c.since <= b and c.applies(node)]
            if steps:
                if where != "graph":
                    return f"{op} in {where} needs a conversion that model-local functions do not support"
                for convert in steps if apply else ():
                    convert(node, ctx)
                continue
            if from_v < 11:
                return f"{op} changed between opset {from_v} and {target} (schema {a} -> {b}); models below opset 11 are raised only when no op changed"
            cond = _condition(node, from_v, b, ctx)
            if cond is not None and op in _SOFTMAX_FAMILY and where == "graph" and target >= 14:
                # Opset-11 semantics, exactly: coerce to 2-D at ``axis``, normalize rows, reshape back.
                if apply:
                    ctx.expand.add(node.output[0])
                continue
            if cond is not None:
                return cond
            if not _structurally_compatible(op, a, b) and op not in _CONDITIONAL:
                return f"{op} changed its signature between opset {from_v} and {target} (schema {a} -> {b})"
    if apply:
        for imp in model.opset_import:
            if imp.domain in DEFAULT_DOMAINS:
                imp.version = target
        for fn in model.functions:
            for imp in fn.opset_import:
                if imp.domain in DEFAULT_DOMAINS and imp.version < target:
                    imp.version = target
        model.graph.initializer.extend(ctx.new_constants)
        if ctx.expand:
            _expand_softmax(model.graph, ctx.expand)
        need_ir = min_ir_version(target)
        if model.ir_version < need_ir:
            model.ir_version = need_ir
    return None
