"""The graph layer: an index over the ModelProto itself, rewritten in place.

A :class:`ModelGraph` builds lnfuse's own node / tensor objects (:mod:`lnfuse.ir`) over a
``ModelProto`` once (each node knows its NodeProto by index; no tensor data is copied) and keeps, for
the main graph and every subgraph (Loop / Scan / If bodies, nested):

* an op-type index (``nodes_by_op``) snapshotted at import, the anchors passes walk;
* producer / consumers of a tensor (the ``inputs`` / ``outputs`` lists of each tensor;
  consumers include nodes of subgraphs that read an outer-scope value, which is what
  "used outside the match" must see);
* constant lookup through initializers, ``Constant`` nodes and ``Identity`` of either;
* dtype / shape lookup, from the model's own annotations and, lazily and at most
  once per model, from ONNX shape inference;
* a unique-name generator for new tensors and nodes.

Rewrites are recorded per graph (``replace``) and applied once per pass by
:meth:`ModelGraph.commit`, which splices the new nodes in at the position of the
node they replace (so topological order holds without a toposort), drops the
replaced nodes and any ``Constant`` node left without consumers. Cost is linear
in the number of nodes. :meth:`ModelGraph.export` writes only the graphs that changed back
into the ModelProto (the loaded one itself, or one copy of a caller's): untouched NodeProtos
and initializers stay as they are, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from lnfuse import derive, ir, shapes
from lnfuse.ir import FLOAT_TYPES, Dim, np_dtype, onnx_dtype  # noqa: F401  (re-exported)
from lnfuse.protos import inferred_or_same, iter_graphs

_ELEMENTWISE_SAME_TYPE = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Identity",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Abs",
        "Exp",
        "Tanh",
        "Sigmoid",
        "Erf",
        "LayerNormalization",
        "Softmax",
        "MatMul",
        "Gemm",
        "Transpose",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Pow",
    }
)


_NAME_PREFIX = 6  # unique_name: names in use are collected by their first characters
_BIG_TENSOR = 1 << 20  # bytes: initializers above this are exported without an intermediate copy
# const_value's and dtype's caches are cleared when they hold this many entries: each block of a
# model reads its own gamma / beta and types its own tensors (model-wide caches only grow: 14 MiB
# on the 110k-node chain), while what blocks share is read again at once.
CONST_CACHE_LIMIT = 1024
_FOLDABLE = frozenset(
    {"Identity", "Cast", "Flatten", "Reshape", "Unsqueeze", "Squeeze", "Shape", "Gather", "ReduceProd"}
    | {"Add", "Sub", "Mul", "Div", "Neg", "CastLike"}
    | shapes.SHAPE_OPS
)


def node_label(n: ir.Node) -> str:
    """A node's name, or ``Op(first output)`` for the unnamed nodes some exporters write."""
    if n.name:
        return n.name
    return f"{n.op}({n.outputs[0].name if n.outputs else ''})"


@dataclass
class GraphView:
    """One (sub)graph with its op-type index and pending rewrites."""

    graph: ir.Graph
    path: str  # "main" or "main/Loop_3:body"
    parent: GraphView | None
    nodes_by_op: dict[str, list[ir.Node]] = field(default_factory=dict)
    output_ids: set[int] = field(default_factory=set)
    removed: list[ir.Node] = field(default_factory=list)  # detached, leaving at the next commit
    inserted: dict[int, list[ir.Node]] = field(default_factory=dict)
    maybe_dead: set[int] = field(default_factory=set)

    def index(self) -> None:
        """The op-type index, and each node's place (``pos``) and view (``scope``)."""
        self.nodes_by_op = {}
        for i, node in enumerate(self.graph.nodes):
            self.nodes_by_op.setdefault(node.op, []).append(node)
            node.pos, node.scope = i, self
        self.output_ids = {id(t) for t in self.graph.outputs}


class ModelGraph:
    """An imported model plus the indexes every pass uses."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph: ir.Graph = ir.import_model(model)
        self.views: list[GraphView] = []
        self._const_cache: dict[int, np.ndarray | None] = {}
        self._dtype_cache: dict[int, int] = {}
        self._derived: dict[int, tuple[Dim, ...] | None] = {}
        inits = {t.name for t in model.graph.initializer}
        self._overridable = {i.name for i in model.graph.input if i.name in inits}
        self._shape_table: dict[str, tuple[int, tuple[Dim, ...] | None]] | None = None
        self._names: dict[str, set[str]] = {}  # see _names_like
        self._counter = 0
        # The tensors whose consumer lists still name detached nodes.
        self._stale: dict[int, ir.Tensor] = {}
        self.reindex()
        # Dead nodes would read tensors a rewrite removes; drop them (the model is only
        # exported when something was rewritten).
        if _remove_dead_nodes(self.views):
            self.reindex()

    # -- structure ----------------------------------------------------------
    def reindex(self) -> None:
        """(Re)build the per-graph indexes; call after a pass committed its rewrites."""
        self.views = []
        self._loop_invariant: dict[int, ir.Tensor] = {}  # body input id -> the outer initial value
        stack: list[tuple[ir.Graph, str, GraphView | None]] = [(self.graph, "main", None)]
        while stack:
            g, path, parent = stack.pop()
            view = GraphView(graph=g, path=path, parent=parent)
            view.index()
            self.views.append(view)
            for node in g.nodes:
                if not node._attrs:
                    continue  # none, or not decoded: no body (bodies are imported with their node)
                for attr_name, sub in ir.bodies(node):
                    label = node.name or node.op
                    stack.append((sub, f"{path}/{label}:{attr_name}", view))
                    if node.op == "Loop" and not node.domain and attr_name == "body":
                        self._loop_invariant.update(_loop_invariants(node, sub))
        self._all_output_ids = set().union(*(v.output_ids for v in self.views))
        self._const_cache.clear()
        self._derived.clear()
        self._dtype_cache.clear()

    @staticmethod
    def view_of(node: ir.Node) -> GraphView | None:
        return node.scope  # type: ignore[return-value]

    def node_count(self) -> int:
        return sum(len(v.graph.nodes) for v in self.views)

    @staticmethod
    def producer(tensor: ir.Tensor) -> ir.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def is_graph_output(self, tensor: ir.Tensor) -> bool:
        """An output of the main graph or of any body."""
        return id(tensor) in self._all_output_ids

    # -- constants ----------------------------------------------------------
    def const_value(self, tensor: ir.Tensor, _depth: int = 0) -> np.ndarray | None:
        """The constant value of ``tensor`` if it is one (initializer, Constant node, Identity of those)."""
        key = id(tensor)
        if key in self._const_cache:
            return self._const_cache[key]
        value: np.ndarray | None = None
        if isinstance(tensor, ir.Constant) and tensor.name in self._overridable:
            # An initializer that is also a graph input is only a default the caller may
            # override at run time (IR >= 4): not a constant.
            self._const_cache[key] = None
            return None
        if isinstance(tensor, ir.Constant):
            try:
                value = tensor.values
            except Exception:  # unloadable (e.g. weights left in an external file)
                value = None
            if value is not None and value.nbytes > _BIG_TENSOR:
                return value  # not cached: no second copy of a big weight
        elif key in self._loop_invariant and _depth < 8:
            # A Loop state the body passes through unchanged: its initial value in every iteration
            # (tf.while_loop carries gamma / beta this way).
            value = self.const_value(self._loop_invariant[key], _depth + 1)
        elif tensor.inputs and _depth < 8:
            node = tensor.inputs[0]
            if node.op == "Constant" and not node.domain:
                value = _constant_node_value(node)
            elif not node.domain and node.inputs and node.op in _FOLDABLE:
                value = self._fold(node, _depth)
        if len(self._const_cache) >= CONST_CACHE_LIMIT:
            self._const_cache.clear()
        self._const_cache[key] = value
        return value

    def _fold(self, node: ir.Node, depth: int) -> np.ndarray | None:
        return derive.fold(self, node, depth)

    def const_shape(self, tensor: ir.Tensor) -> tuple[int, ...] | None:
        """Shape of a constant without loading its data (None if ``tensor`` is not constant)."""
        src = self.constant_source(tensor)
        if isinstance(src, ir.Constant):
            return tuple(int(d) for d in src.shape)
        val = self.const_value(tensor) if src.inputs and src.inputs[0].op == "Constant" else None
        return None if val is None else tuple(val.shape)

    def constant_source(self, tensor: ir.Tensor) -> ir.Tensor:
        """Follow Identity nodes back to the tensor that holds the constant."""
        t = tensor
        for _ in range(8):
            if t.inputs and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
                t = t.inputs[0].inputs[0]
            else:
                break
        return t

    # -- types and shapes ---------------------------------------------------
    def dtype(self, tensor: ir.Tensor, _depth: int = 0) -> int | None:
        """ONNX element type of ``tensor``: annotations, then local propagation, then shape inference."""
        key = id(tensor)
        if key in self._dtype_cache:
            return self._dtype_cache[key]
        dt = self._dtype(tensor, _depth)
        if dt is not None:
            if len(self._dtype_cache) >= CONST_CACHE_LIMIT:
                self._dtype_cache.clear()
            self._dtype_cache[key] = dt
        return dt

    def _dtype(self, tensor: ir.Tensor, _depth: int = 0) -> int | None:
        if isinstance(tensor, ir.Constant):
            return onnx_dtype(tensor.dtype)
        dt = onnx_dtype(tensor.dtype) if tensor.dtype is not None else None
        if dt:
            return dt
        node = self.producer(tensor)
        if node is not None and _depth < 16 and not node.domain:
            if node.op == "Cast":
                return int(node.attrs["to"])
            if node.op == "Constant":
                val = self.const_value(tensor)
                return onnx_dtype(val.dtype) if val is not None else None
            if node.op in _ELEMENTWISE_SAME_TYPE and node.inputs:
                # A constant operand of a same-type op gives the answer without recursing.
                if node.op in ("Add", "Sub", "Mul", "Div"):
                    for inp in node.inputs:
                        if isinstance(inp, ir.Constant):
                            return onnx_dtype(inp.dtype)
                dt = self.dtype(node.inputs[0], _depth + 1)
                if dt:
                    return dt
        entry = self.shape_table().get(tensor.name)
        return entry[0] if entry else None

    def shape(self, tensor: ir.Tensor) -> tuple[Dim, ...] | None:
        """Shape of ``tensor`` (ints, symbolic names or None per dim), or None if the rank is unknown."""
        if isinstance(tensor, ir.Constant):
            return tuple(int(d) for d in tensor.shape)
        if tensor.shape is not None:
            dims = tuple(_norm_dim(d) for d in tensor.shape)
            if all(isinstance(d, int) for d in dims):
                return dims
            inferred = self.shape_table().get(tensor.name)
            if inferred and inferred[1] is not None and len(inferred[1]) == len(dims):
                return tuple(d if isinstance(d, int) else i for d, i in zip(dims, inferred[1], strict=False))
            return dims
        entry = self.shape_table().get(tensor.name)
        if entry and entry[1] is not None:
            return entry[1]
        key = id(tensor)
        if key not in self._derived:
            self._derived[key] = None  # (a cycle guard while it is worked out)
            self._derived[key] = derive.derived_shape(self, tensor)
        return self._derived[key]

    def shape_table(self) -> dict[str, tuple[int, tuple[Dim, ...] | None]]:
        """Name -> (elem_type, dims) from ONNX shape inference, computed at most once."""
        if self._shape_table is None:
            self._shape_table = _infer_shapes(self.model)
        return self._shape_table

    # -- naming ---------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """``base``, or ``base_<n>`` with the first ``n`` that no node or tensor uses yet."""
        taken = self._names_like(base)
        name = base
        while name in taken:
            self._counter += 1
            name = f"{base}_{self._counter}"
        for key, names in self._names.items():
            if name.startswith(key):
                names.add(name)
        return name

    def _names_like(self, base: str) -> set[str]:
        """The names in use that begin as ``base`` does (its first ``_NAME_PREFIX`` characters),
        names handed out since included: every name ``unique_name(base)`` may try begins so.
        lnfuse's own bases begin ``lnfuse``, which next to no model uses (a set of every name of
        the 110k-node chain was 8 MiB)."""
        key = base[:_NAME_PREFIX]
        taken = self._names.get(key)
        if taken is not None:
            return taken
        taken = {m for names in self._names.values() for m in names if m.startswith(key)}
        # Tensors are defined by node outputs, graph inputs and initializers (those in use are
        # node inputs); an unused initializer stays in the output.
        for v in self.views:
            g = v.graph
            taken.update(t.name for t in g.inputs if t.name.startswith(key))
            taken.update(c for c in g.constants if c.startswith(key))
            for n in g.nodes:
                if n.name.startswith(key):
                    taken.add(n.name)
                taken.update(t.name for t in n.outputs if t.name.startswith(key))
        self._names[key] = taken
        return taken

    # -- rewriting ------------------------------------------------------------
    def replace(
        self, view: GraphView, nodes: Iterable[ir.Node], anchor: ir.Node, new_nodes: list[ir.Node]
    ) -> None:
        """Schedule ``nodes`` for removal and ``new_nodes`` for insertion where ``anchor`` stands.

        The caller rewires tensors when it builds ``new_nodes`` (they produce the
        old output tensors) after detaching the old producers with :meth:`detach`.
        ``anchor`` must be the last of ``nodes`` in graph order, so every input
        of the new nodes is defined before that position.
        """
        view.removed.extend(nodes)
        view.inserted.setdefault(id(anchor), []).extend(new_nodes)

    def detach(self, nodes: Iterable[ir.Node]) -> None:
        """Disconnect ``nodes`` from their tensors, remembering producers that may now be dead.

        The nodes leave their input tensors' consumer lists at the next :meth:`flush` (commit
        calls it), in one pass per tensor: removing k of a shared constant's n consumers one by
        one would cost k*n (and onnx-graphsurgeon's list removal compares nodes with ``==``).
        """
        nodes = list(nodes)
        region = {id(n) for n in nodes}
        for n in nodes:
            self._unlink(n, region)

    def _unlink(self, node: ir.Node, region: set[int] | None = None) -> None:
        """Detach one node. With ``region`` (ids of all nodes removed together), a tensor that
        lives only inside it (made and read there, not a graph output) is left as it is: once
        the region goes nothing that stays can reach it, so its lists need no repair."""
        outputs = self._all_output_ids
        for t in node.inputs:
            producers = t.inputs
            if (
                region is not None
                and producers
                and id(producers[0]) in region
                and id(t) not in outputs
                and all(id(c) in region for c in t.outputs)
            ):
                continue
            src = producers[0] if producers else None
            if src is not None:
                owner = src.scope
                if owner is not None:
                    owner.maybe_dead.add(id(src))
            self._stale[id(t)] = t
        node.detached = True
        list.clear(node.inputs)
        for t in node.outputs:
            if region is not None and id(t) not in outputs and all(id(c) in region for c in t.outputs):
                continue  # internal (its producer, this node, is in the region)
            producers = t.inputs
            if len(producers) == 1 and producers[0] is node:
                list.clear(producers)
            else:
                kept = [p for p in producers if p is not node]
                list.clear(producers)
                list.extend(producers, kept)
        list.clear(node.outputs)

    def flush(self) -> None:
        """Drop detached nodes from the consumer lists of the tensors they read."""
        for t in self._stale.values():
            consumers = t.outputs
            kept = [c for c in consumers if not c.detached]
            if len(kept) != len(consumers):
                list.clear(consumers)
                list.extend(consumers, kept)
        self._stale = {}

    def commit(self) -> int:
        """Apply scheduled rewrites in every graph, in one linear sweep each. Returns graphs changed."""
        changed = 0
        self.flush()
        left: list[ir.Node] = []  # the nodes that leave the graphs
        for view in reversed(self.views):  # bodies before the graphs that own them
            if not view.removed and not view.inserted and not view.maybe_dead:
                continue
            changed += 1
            new_list: list[ir.Node] = []
            for node in view.graph.nodes:
                key = id(node)
                if key in view.inserted:
                    new_list.extend(view.inserted[key])
                if node.detached:
                    left.append(node)
                    continue
                new_list.append(node)
            # Producers left without consumers by a rewrite go too, transitively (reverse order:
            # a node's consumers come after it, so one backward sweep settles everything).
            if view.maybe_dead:
                for node in reversed(new_list):
                    if id(node) not in view.maybe_dead or not node.outputs:
                        continue
                    if any(
                        id(t) in view.output_ids or any(not c.detached for c in t.outputs)
                        for t in node.outputs
                    ):
                        continue
                    self._unlink(node)  # dead: detached too
                left += [n for n in new_list if n.detached]
                new_list = [n for n in new_list if not n.detached]
            view.graph.nodes = new_list
            view.graph.dirty = True
            view.removed = []
            view.inserted = {}
            view.maybe_dead = set()
        self.flush()
        _cut(left)
        if changed:
            self.reindex()
        return changed

    def export(self, *, consume: bool = False) -> onnx.ModelProto:
        """The model with every rewritten graph written back.

        Only graphs a rewrite changed are written: their node lists are rebuilt from the kept
        NodeProtos (untouched, byte for byte) and the new nodes' protos; initializers nothing
        reads go, the new nodes' constants are added, and ``value_info`` of
        tensors that no longer exist is dropped. ``consume=True`` (the caller owns the loaded
        ModelProto and will not use it again) writes into that ModelProto itself, so its weights
        are never copied; otherwise the result is one copy of it. The ModelGraph is spent.
        """
        self.flush()
        target = self.model
        if not consume:
            target = onnx.ModelProto()
            target.CopyFrom(self.model)
        for view in reversed(self.views):  # bodies before the graphs whose nodes hold them
            g = view.graph
            gp = ir.resolve(target, g.locator)
            if g.dirty:
                _write_nodes(g, gp)
            _drop_unused(g, gp, self._overridable if view.parent is None else set())
        return target

    def release(self) -> None:
        """Free the graph objects once the model is exported (the ModelProto holds the result).

        Nodes and tensors link each other both ways. Cutting each node's links lets reference
        counting free them all at once instead of leaving them to the cyclic GC (which the command
        line runs without), so their memory is back before the output is checked. The ModelGraph
        and its nodes' links are unusable afterwards.
        """
        for view in self.views:
            for node in view.graph.nodes:
                node.inputs = []
                node.outputs = []
                node.scope = None
        self.views = []
        self._loop_invariant = {}
        self._all_output_ids = set()
        self._const_cache.clear()
        self._derived.clear()
        self._dtype_cache.clear()
        self._shape_table = None
        self._names = {}
        del self.graph
        del self.model


def _cut(nodes: list[ir.Node]) -> None:
    """Forget the view of nodes that left their graph: the view's op-type index names them, so a
    removed node naming its old view would be a reference cycle (view, index, node) that the
    command line (no cyclic GC) keeps for good, and with it the whole graph."""
    for node in nodes:
        node.scope = None


def _write_nodes(g: ir.Graph, gp: onnx.GraphProto) -> None:
    """Write ``gp``'s node list from ``g`` (kept nodes by their import index, in place when
    :func:`_compacts`, else rebuilt) and its value_info (entries of tensors no longer defined go;
    new typed tensors get one)."""
    added: dict[str, ir.Constant] = {}
    typed: list[ir.Tensor] = []
    for node in g.nodes:
        if node.index >= 0:
            continue
        for t in node.inputs:
            if isinstance(t, ir.Constant) and t.proto is None:
                added.setdefault(t.name, t)
        typed += [t for t in node.outputs if t.name and t.dtype]
    if _compacts(g.nodes):
        _compact_nodes(g.nodes, gp)
    else:
        current = list(gp.node)
        new_protos = {id(n): n.to_proto() for n in g.nodes if n.index < 0}  # before any moves
        protos = [current[n.index] if n.index >= 0 else new_protos[id(n)] for n in g.nodes]
        del gp.node[:]
        gp.node.extend(protos)
    have = {t.name for t in gp.initializer}
    for name, c in added.items():
        if name not in have:
            gp.initializer.append(c.to_proto())
    kept: list[onnx.ValueInfoProto] = []
    if len(gp.value_info):
        defined = (
            {t.name for n in g.nodes for t in n.outputs} | {i.name for i in gp.input} | have | set(added)
        )
        kept = [vi for vi in gp.value_info if vi.name in defined]
    known = {vi.name for vi in kept} | {o.name for o in gp.output}
    kept += [helper.make_tensor_value_info(t.name, t.dtype, None) for t in typed if t.name not in known]
    if len(gp.value_info) or kept:
        del gp.value_info[:]
        gp.value_info.extend(kept)


def _compacts(nodes: list[ir.Node]) -> bool:
    """True when the new node list can be written over the old one front to back: no kept node
    moves backwards. Writing slot ``w`` then only ever destroys a NodeProto that was already
    copied, or one no kept node reads (a later kept node reading slot ``w`` would move back)."""
    return all(node.index < 0 or w <= node.index for w, node in enumerate(nodes))


def _compact_nodes(nodes: list[ir.Node], gp: onnx.GraphProto) -> None:
    """Write the node list in place: kept NodeProtos move forward (one C copy each, none for those
    that stay where they are), new nodes are written into the freed slots, the tail goes. Unlike a
    rebuild, no NodeProto of a removed node and none of an unchanged prefix is touched. A new node
    whose attributes are not all its own (``Node.self_contained``) is written first, before any
    slot changes."""
    early = {id(n): n.to_proto() for n in nodes if n.index < 0 and not n.self_contained()}
    slots = gp.node
    size = len(slots)
    for w, node in enumerate(nodes):
        if node.index == w:
            continue
        if node.index >= 0 or id(node) in early:
            src = slots[node.index] if node.index >= 0 else early[id(node)]
            if w < size:
                slots[w].CopyFrom(src)
            else:
                slots.append(src)
        else:
            node.write_to(slots[w] if w < size else slots.add())
    if len(nodes) < len(slots):
        del slots[len(nodes) :]


def _drop_unused(g: ir.Graph, gp: onnx.GraphProto, keep: set[str]) -> None:
    """Delete the initializers of ``g`` that nothing reads (``keep``: the graph inputs among them)."""
    out_names = {t.name for t in g.outputs}
    drop = {n for n, c in g.constants.items() if not c.outputs and n not in out_names and n not in keep}
    if not drop:
        return
    inits = gp.initializer
    for i in reversed([i for i, t in enumerate(inits) if t.name in drop]):
        del inits[i]  # one at a time: the others (big weights among them) are never copied


def _loop_invariants(loop: ir.Node, body: ir.Graph) -> dict[int, ir.Tensor]:
    """Loop-carried states the body returns unchanged (output ``i - 1`` is input ``i``, through
    Identity nodes), each mapped to the Loop's initial value for it."""
    out: dict[int, ir.Tensor] = {}
    for i in range(2, min(len(body.inputs), len(body.outputs) + 1, len(loop.inputs))):
        t = body.outputs[i - 1]
        for _ in range(4):
            p = t.inputs[0] if t.inputs else None
            if p is None or p.op != "Identity" or p.domain:
                break
            t = p.inputs[0]
        if t is body.inputs[i] and loop.inputs[i].name:
            out[id(body.inputs[i])] = loop.inputs[i]
    return out


def _remove_dead_nodes(views: list[GraphView]) -> bool:
    """Drop nodes whose outputs nothing reads (transitively; bodies first, so a body's dead
    reads of an outer value count as none). True if any went."""
    changed = False
    for view in reversed(views):
        g = view.graph
        outs = {id(t) for t in g.outputs}
        if not _has_sink(g.nodes, outs):
            continue  # a dead region always ends in a node nothing reads
        dead: set[int] = set()
        for node in reversed(g.nodes):
            if node.outputs and not any(
                id(t) in outs or any(id(c) not in dead for c in t.outputs) for t in node.outputs
            ):
                dead.add(id(node))
                for sub in _all_body_nodes(node):
                    for t in sub.inputs:
                        t.outputs[:] = [c for c in t.outputs if c is not sub]
        if not dead:
            continue
        changed = g.dirty = True
        for node in g.nodes:
            if id(node) in dead:
                for t in node.inputs:
                    t.outputs[:] = [c for c in t.outputs if id(c) not in dead]
                for t in node.outputs:
                    t.inputs[:] = [p for p in t.inputs if p is not node]
        g.nodes = [n for n in g.nodes if id(n) not in dead]
    return changed


def _has_sink(nodes: list[ir.Node], outs: set[int]) -> bool:
    """Some node has outputs and none of them is read or a graph output."""
    for node in nodes:
        for t in node.outputs:
            if t.outputs or id(t) in outs:
                break
        else:
            if node.outputs:
                return True
    return False


def _all_body_nodes(node: ir.Node) -> list[ir.Node]:
    out: list[ir.Node] = []
    stack = [g for _, g in ir.bodies(node)]
    while stack:
        g = stack.pop()
        out += g.nodes
        for n in g.nodes:
            stack += [b for _, b in ir.bodies(n)]
    return out


def _norm_dim(d: object) -> Dim:
    if isinstance(d, (int, np.integer)):
        return int(d) if int(d) >= 0 else None
    if isinstance(d, str) and d:
        return d
    return None


def _constant_node_value(node: ir.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return ir.tensor_array(v) if isinstance(v, (ir.Constant, onnx.TensorProto)) else None
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.asarray(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.asarray(attrs["value_ints"], dtype=np.int64)
    return None


def _value_info_entry(vi: onnx.ValueInfoProto) -> tuple[int, tuple[Dim, ...] | None] | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    return tt.elem_type, tuple(ir.shape_dims(tt.shape))


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[Dim, ...] | None]]:
    table: dict[str, tuple[int, tuple[Dim, ...] | None]] = {}
    inferred = inferred_or_same(model)
    for g in iter_graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            entry = _value_info_entry(vi)
            if entry is not None:
                table.setdefault(vi.name, entry)
        for init in g.initializer:
            table.setdefault(init.name, (init.data_type, tuple(int(d) for d in init.dims)))
    return table
