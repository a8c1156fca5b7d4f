"""lnfuse's graph objects: nodes and tensors over a ModelProto, with producer / consumer links.

:func:`import_model` builds them in one sweep over the protobuf, without copying any tensor
data: each imported :class:`Node` keeps its index in its GraphProto (its NodeProto is looked up
when needed), each
initializer becomes a :class:`Constant` that reads its ``TensorProto`` only when asked. A
tensor's ``inputs`` is the list of its producers (zero or one node), its ``outputs`` the list
of its consumers, nodes of subgraphs that read it from an outer scope included. Attributes are
decoded on first use, except graph attributes (Loop / Scan / If bodies), which are imported
with their node so that every (sub)graph is known up front.

New nodes and tensors (a rewrite's) are built with the constructors, which link them the same
way; :mod:`lnfuse.graph` writes them back into the ModelProto (:meth:`Node.to_proto`,
:meth:`Constant.to_proto`). Nothing here touches a third-party class or any global state.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import AttributeProto as AP
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

Dim = int | str | None

# Little-endian numpy types of the tensor types whose raw_data is the plain array bytes.
_RAW_DTYPES: dict[int, np.dtype] = {
    TP.FLOAT: np.dtype("<f4"),
    TP.FLOAT16: np.dtype("<f2"),
    TP.DOUBLE: np.dtype("<f8"),
    TP.INT64: np.dtype("<i8"),
    TP.INT32: np.dtype("<i4"),
    TP.INT16: np.dtype("<i2"),
    TP.INT8: np.dtype("i1"),
    TP.UINT8: np.dtype("u1"),
    TP.BOOL: np.dtype("?"),
}
_GRAPH_ATTRS = (AP.GRAPH, AP.GRAPHS)


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


FLOAT_TYPES = frozenset({TP.FLOAT, TP.FLOAT16, TP.DOUBLE, TP.BFLOAT16})

_CONTROL_FLOW = frozenset({"Loop", "Scan", "If"})


def elem_type(dtype: object) -> int | None:
    """ONNX element type of a numpy dtype or an ONNX type number (None when unknown)."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype) or None
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))  # type: ignore[arg-type]
    except (TypeError, KeyError, ValueError):
        return None


onnx_dtype = elem_type  # the name the rest of lnfuse uses


class Tensor:
    """A value: ``inputs`` = producers (at most one node), ``outputs`` = consumers."""

    __slots__ = ("__weakref__", "dtype", "inputs", "name", "outputs", "shape")

    def is_empty(self) -> bool:
        return not self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Variable(Tensor):
    """A tensor computed at run time (graph input or node output). ``dtype`` is an ONNX type
    number, ``shape`` a list of ints / symbolic names / None, or None when the rank is unknown."""

    __slots__ = ()

    def __init__(self, name: str, dtype: object = None, shape: Iterable[Dim] | None = None) -> None:
        self.name = name
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.dtype = elem_type(dtype)
        self.shape = None if shape is None else list(shape)

    @staticmethod
    def empty() -> Variable:
        """The placeholder for an omitted optional input or output."""
        return Variable("")


class Constant(Tensor):
    """An initializer (``proto``, read on demand) or a value a rewrite adds (``values``)."""

    __slots__ = ("_values", "proto")

    def __init__(self, name: str, values: object = None, *, proto: onnx.TensorProto | None = None) -> None:
        self.name = name
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.proto = proto
        if proto is not None:
            self._values = None
            self.dtype = int(proto.data_type) or None
            self.shape = [int(d) for d in proto.dims]
        else:
            arr = np.asarray(values)
            self._values = arr
            self.dtype = elem_type(arr.dtype)
            self.shape = list(arr.shape)

    @property
    def values(self) -> np.ndarray:
        """The value (raises when it cannot be read, e.g. weights left in an external file)."""
        if self._values is not None:
            return self._values
        assert self.proto is not None
        return proto_array(self.proto)

    def to_proto(self) -> onnx.TensorProto:
        if self.proto is not None:
            return self.proto
        return numpy_helper.from_array(np.asarray(self.values), self.name)


def proto_array(proto: onnx.TensorProto) -> np.ndarray:
    """The (read-only) value of an initializer; ``raw_data`` of a common type is viewed in place
    (``numpy_helper.to_array`` costs ~10 us a tensor). External data is never read from here."""
    if proto.data_location == TP.EXTERNAL:
        raise ValueError(f"initializer {proto.name!r} is stored in an external file")
    dt = _RAW_DTYPES.get(proto.data_type)
    if dt is not None and proto.HasField("raw_data"):
        dims = tuple(int(d) for d in proto.dims)
        raw = proto.raw_data
        if len(raw) == math.prod(dims) * dt.itemsize:
            return np.frombuffer(raw, dtype=dt).reshape(dims).astype(dt.newbyteorder("="), copy=False)
    return numpy_helper.to_array(proto)


def make_attribute(key: str, value: object) -> onnx.AttributeProto:
    """``helper.make_attribute`` for the values rewrites write (int, float, list of ints), built
    directly (the helper's type probing costs ~6 us an attribute); anything else goes to it."""
    kind = type(value)
    if kind is int:
        return onnx.AttributeProto(name=key, type=AP.INT, i=value)  # type: ignore[arg-type]
    if kind is float:
        return onnx.AttributeProto(name=key, type=AP.FLOAT, f=value)  # type: ignore[arg-type]
    if kind is list and value and all(type(v) is int for v in value):  # type: ignore[attr-defined]
        return onnx.AttributeProto(name=key, type=AP.INTS, ints=value)  # type: ignore[arg-type]
    if isinstance(value, Constant):
        value = value.to_proto()
    return helper.make_attribute(key, value)


def tensor_array(value: object) -> np.ndarray:
    """The array of a tensor-valued attribute (a TensorProto, or a rewrite's Constant)."""
    if isinstance(value, Constant):
        return np.asarray(value.values)
    return proto_array(value)  # type: ignore[arg-type]


class _Attrs(dict):
    """Decoded attributes, read-only: nodes with the same attributes share one (every node that
    has none shares ``_NO_ATTRS``)."""

    __slots__ = ()

    def _refuse(self, *_: object, **__: object) -> None:
        raise TypeError("decoded node attributes are shared and read-only")

    __setitem__ = __delitem__ = __ior__ = setdefault = update = pop = popitem = clear = _refuse  # type: ignore[assignment]


_NO_ATTRS: dict[str, object] = _Attrs()


def shared_attrs(attrs: dict[str, object]) -> bool:
    """``attrs`` is a decoded, read-only attribute set (one node's or several nodes' alike): it never
    changes, so what is derived from it may be kept."""
    return type(attrs) is _Attrs


_SHAREABLE = frozenset((AP.FLOAT, AP.INT, AP.STRING, AP.INTS, AP.FLOATS, AP.STRINGS))


class Source:
    """The GraphProto imported nodes come from, and the attribute sets decoded from its nodes
    (the 20k ReduceMean of the 110k-node chain have two: two dicts instead of 20k, 5 MiB less)."""

    __slots__ = ("attrs", "gp")

    def __init__(self, gp: onnx.GraphProto) -> None:
        self.gp = gp
        self.attrs: dict[tuple[bytes, ...], dict[str, object]] = {}

    def decode(self, proto: onnx.NodeProto) -> dict[str, object]:
        """``proto``'s attributes (it has some: an imported node without any is given ``_NO_ATTRS``
        at import); small plain ones (numbers, strings, their lists) shared."""
        if not all(a.type in _SHAREABLE for a in proto.attribute):
            return _decoded(proto)
        key = tuple(a.SerializeToString() for a in proto.attribute)
        found = self.attrs.get(key)
        if found is None:
            found = self.attrs[key] = _decoded(proto)
        return found


def _decoded(proto: onnx.NodeProto) -> dict[str, object]:
    return _Attrs((a.name, attribute_value(a, None)) for a in proto.attribute)


_PLAIN_ITEMS = (int, float, str, bytes)  # attribute values (and list items) self_contained() accepts
_PLAIN = (*_PLAIN_ITEMS, Constant)
UNPLACED = 1 << 60  # Node.pos of a node no graph index has placed yet (after every placed one)


class Node:
    """One operator. ``index``: its position in the GraphProto it was imported from (-1 for a
    rewrite's new node); ``proto``: that NodeProto, looked up when needed (not held: 110k protobuf
    wrappers would be 110k more objects for the cyclic GC to scan). ``pos`` and ``scope``: its
    place in its graph's node list and that graph's view, kept by the graph layer's index
    (``graph.GraphView.index``; two dicts keyed by node would cost 17 MiB on 110k nodes);
    ``detached``: a rewrite took it out (it leaves its graph at the next commit)."""

    __slots__ = (
        "__weakref__",
        "_attrs",
        "_src",
        "detached",
        "domain",
        "index",
        "inputs",
        "name",
        "op",
        "outputs",
        "pos",
        "scope",
    )

    def __init__(
        self,
        op: str,
        name: str | None = None,
        attrs: dict[str, object] | None = None,
        inputs: Iterable[Tensor] | None = None,
        outputs: Iterable[Tensor] | None = None,
        domain: str | None = None,
    ) -> None:
        self.op = op
        self.name = name or ""
        self.domain = domain
        self._src: Source | None = None
        self.index = -1
        self.pos = UNPLACED
        self.scope: object = None
        self.detached = False
        self._attrs: dict[str, object] | None = dict(attrs) if attrs else {}
        self.inputs: list[Tensor] = list(inputs or ())
        self.outputs: list[Tensor] = list(outputs or ())
        for t in self.inputs:
            t.outputs.append(self)
        for t in self.outputs:
            t.inputs.append(self)

    @property
    def proto(self) -> onnx.NodeProto | None:
        return None if self._src is None else self._src.gp.node[self.index]

    @property
    def attrs(self) -> dict[str, object]:
        """The attributes, decoded on first use: read-only and shared by the nodes of one graph
        that have the same ones (:class:`Source`); a new node's or a clone's are its own."""
        if self._attrs is None:
            assert self._src is not None
            self._attrs = self._src.decode(self._src.gp.node[self.index])
        return self._attrs

    def to_proto(self) -> onnx.NodeProto:
        """A NodeProto for a new node (an imported one keeps its own)."""
        return self.write_to(onnx.NodeProto())

    def reads_its_source(self) -> bool:
        """A clone whose attributes are still those of its source's NodeProto (see ``clone``)."""
        return self._attrs is None and self._src is not None

    def self_contained(self) -> bool:
        """Its attributes are its own Python values (numbers, strings, their lists, a rewrite's
        Constant), not protobuf messages that may be views into a NodeProto of the graph: its
        proto can be written after that NodeProto was overwritten."""
        if self.reads_its_source():
            return False
        return all(
            isinstance(v, _PLAIN) or (type(v) is list and all(isinstance(x, _PLAIN_ITEMS) for x in v))
            for v in self.attrs.values()
        )

    def write_to(self, proto: onnx.NodeProto) -> onnx.NodeProto:
        """Write this new node into ``proto``, cleared first: a slot of the graph's own node list
        can take it, with no message of its own (10k new nodes' own messages: 15 MiB)."""
        proto.Clear()
        proto.op_type = self.op
        proto.input.extend(t.name for t in self.inputs)
        proto.output.extend(t.name for t in self.outputs)
        if self.name:
            proto.name = self.name
        if self.domain is not None:
            proto.domain = self.domain
        if self.reads_its_source():
            proto.attribute.extend(self._src.gp.node[self.index].attribute)  # type: ignore[union-attr]
            return proto
        proto.attribute.extend(make_attribute(key, value) for key, value in self.attrs.items())
        return proto

    def clone(self, inputs: Iterable[Tensor], outputs: Iterable[Tensor]) -> Node:
        """A new node like this one (same op, name, attributes) between other tensors."""
        node = Node(self.op, self.name, None, inputs, outputs, self.domain)
        if self._src is not None and self._attrs is None:
            node._src, node.index, node._attrs = self._src, self.index, None  # same NodeProto's attributes
        else:
            node._attrs = dict(self.attrs)
        return node

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.name!r})"


class Graph:
    """A (sub)graph: its nodes in order, its inputs and outputs, where it came from."""

    __slots__ = ("constants", "dirty", "inputs", "locator", "name", "nodes", "outputs", "proto")

    def __init__(self, proto: onnx.GraphProto, locator: tuple[tuple[int, int, int], ...]) -> None:
        self.nodes: list[Node] = []
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.name = proto.name
        self.proto = proto
        self.locator = locator  # (node index, attribute index, graph index) steps from the main graph
        self.constants: dict[str, Constant] = {}  # its initializers
        self.dirty = False  # nodes changed since import: written back at export


def attribute_value(a: onnx.AttributeProto, graph: Callable[[onnx.GraphProto, int], Graph] | None) -> object:
    """Python value of an attribute: numbers, str, lists, TensorProto; bodies via ``graph``."""
    t = a.type
    if t == AP.FLOAT:
        return a.f
    if t == AP.INT:
        return a.i
    if t == AP.STRING:
        return a.s.decode("utf-8", "replace")
    if t == AP.INTS:
        return list(a.ints)
    if t == AP.FLOATS:
        return list(a.floats)
    if t == AP.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    if t == AP.TENSOR:
        return a.t
    if t == AP.TENSORS:
        return list(a.tensors)
    if t == AP.GRAPH:
        return graph(a.g, 0) if graph is not None else a.g
    if t == AP.GRAPHS:
        return [graph(g, i) if graph is not None else g for i, g in enumerate(a.graphs)]
    if t == AP.SPARSE_TENSOR:
        return a.sparse_tensor
    if t == AP.TYPE_PROTO:
        return a.tp
    return None


def graphs_of(value: object) -> list[Graph]:
    """The graphs an attribute value holds (a body, or a list of them)."""
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, Graph)]


def bodies(node: Node) -> list[tuple[str, Graph]]:
    """(attribute name, graph) for each body a node holds."""
    attrs = node._attrs if node._attrs is not None else node.attrs
    return [(k, g) for k, v in attrs.items() for g in graphs_of(v)]


def import_model(model: onnx.ModelProto) -> Graph:
    """The main graph of ``model`` (its bodies reachable through node attributes)."""
    return _import_graph(model.graph, [], ())


def _import_graph(gp: onnx.GraphProto, outer: list[dict[str, Tensor]], locator: tuple) -> Graph:
    graph = Graph(gp, locator)
    local: dict[str, Tensor] = {}
    for init in gp.initializer:
        c = Constant(init.name, proto=init)
        local[init.name] = graph.constants[init.name] = c
    for vi in gp.input:
        t = local.get(vi.name)
        if t is None:
            t = local[vi.name] = Variable(vi.name)
            _annotate(t, vi)
        graph.inputs.append(t)
    scopes = [local, *outer]

    def find(name: str) -> Tensor:
        if not name:
            return Variable("")
        for scope in scopes:
            t = scope.get(name)
            if t is not None:
                return t
        t = local[name] = Variable(name)
        return t

    new_node, new_var, intern = Node.__new__, Variable.__new__, sys.intern
    source = Source(gp)
    get = local.get
    nodes = graph.nodes
    for i, p in enumerate(gp.node):
        node = new_node(Node)
        node.op = intern(p.op_type)  # one string per op type, not one per node
        node.name = p.name
        node.domain = p.domain if p.HasField("domain") else None
        node._src = source
        node.index = i
        node.pos, node.scope, node.detached = UNPLACED, None, False
        if not len(p.attribute):
            node._attrs = _NO_ATTRS  # nothing to decode later (7 of the 9 nodes of a torch LN)
        elif p.op_type in _CONTROL_FLOW or any(a.type in _GRAPH_ATTRS for a in p.attribute):
            # Bodies first: their reads of outer values come before this node in consumer lists.
            node._attrs = {
                a.name: attribute_value(a, _body_importer(scopes, (*locator, (i, k))))
                for k, a in enumerate(p.attribute)
            }
        else:
            node._attrs = None  # decoded on first use
        ins = []
        for name in p.input:
            t = get(name) if name else None
            if t is None:
                t = find(name)  # an outer scope's, an undefined one, or an omitted input
            t.outputs.append(node)
            ins.append(t)
        node.inputs = ins
        outs = []
        for name in p.output:
            t = get(name) if name else None
            if t is None:  # the usual case, built inline (110k nodes: ~0.3 s less than Variable())
                t = new_var(Variable)
                t.name, t.inputs, t.outputs, t.dtype, t.shape = name, [node], [], None, None
                if name:
                    local[name] = t
            else:
                t.inputs.append(node)
            outs.append(t)
        node.outputs = outs
        nodes.append(node)
    for vi in (*gp.value_info, *gp.output):
        t = local.get(vi.name)
        if isinstance(t, Variable):
            _annotate(t, vi)
    graph.outputs = [find(o.name) for o in gp.output]
    return graph


def _body_importer(scopes: list[dict[str, Tensor]], where: tuple) -> Callable[[onnx.GraphProto, int], Graph]:
    return lambda g, j: _import_graph(g, scopes, (*where[:-1], (*where[-1], j)))


def _annotate(t: Tensor, vi: onnx.ValueInfoProto) -> None:
    """dtype / shape of ``t`` from a ValueInfoProto (tensor types only)."""
    if not vi.type.HasField("tensor_type"):
        return
    tt = vi.type.tensor_type
    t.dtype = int(tt.elem_type) or t.dtype
    if tt.HasField("shape"):
        t.shape = shape_dims(tt.shape)


def shape_dims(shape: onnx.TensorShapeProto) -> list[Dim]:
    """Dims of a TensorShapeProto: ints, symbolic names, or None where unknown."""
    dims: list[Dim] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def resolve(model: onnx.ModelProto, locator: tuple[tuple[int, int, int], ...]) -> onnx.GraphProto:
    """The GraphProto at ``locator`` in ``model`` (a copy of the model the locator was made in)."""
    g = model.graph
    for node_i, attr_i, graph_i in locator:
        a = g.node[node_i].attribute[attr_i]
        g = a.g if a.type == AP.GRAPH else a.graphs[graph_i]
    return g


def standalone_model(
    nodes: list[Node], inputs: list[Tensor], outputs: list[Tensor], opset: int, ir_version: int
) -> onnx.ModelProto:
    """A model of just ``nodes``: their Constant inputs become initializers; the default domain
    at ``opset``, any other domain the nodes use at version 1."""
    consts: dict[str, Constant] = {}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, Constant):
                consts.setdefault(t.name, t)

    def info(t: Tensor) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(t.name, t.dtype or 0, t.shape)

    graph = helper.make_graph(
        [n.to_proto() for n in nodes],
        "lnfuse",
        [info(t) for t in inputs],
        [info(t) for t in outputs],
        [c.to_proto() for c in consts.values()],
    )
    domains = sorted({n.domain for n in nodes if n.domain})
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
