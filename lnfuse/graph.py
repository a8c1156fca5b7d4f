"""Typed helpers over onnx-graphsurgeon, so passes never touch its internals.

A :class:`ModelGraph` imports a ``ModelProto`` once into an onnx-graphsurgeon
``Graph`` and keeps, for the main graph and every subgraph (Loop / Scan / If
bodies, nested):

* an op-type index (``nodes_by_op``) snapshotted at import, the anchors passes walk;
* producer / consumers of a tensor (onnx-graphsurgeon keeps these as the
  ``inputs`` / ``outputs`` lists of each tensor; consumers include nodes of
  subgraphs that read an outer-scope value, which is what "used outside the
  match" must see);
* constant lookup through initializers, ``Constant`` nodes and ``Identity`` of either;
* dtype / shape lookup, from the model's own annotations and, lazily and at most
  once per model, from ONNX shape inference;
* a unique-name generator for new tensors and nodes.

Rewrites are recorded per graph (``replace``) and applied once per pass by
:meth:`ModelGraph.commit`, which splices the new nodes in at the position of the
node they replace (so topological order holds without a toposort), drops the
replaced nodes and any ``Constant`` node left without consumers. Cost is linear
in the number of nodes.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto as TP
from onnx import helper

from lnfuse import shapes
from lnfuse.protos import copy_fields, inferred_or_same, iter_graphs, tensor_nbytes

Dim = int | str | None

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


_BIG_TENSOR = 1 << 20  # bytes: initializers above this are exported without an intermediate copy
_FOLDABLE = frozenset(
    {"Identity", "Cast", "Flatten", "Reshape", "Unsqueeze", "Squeeze", "Shape", "Gather", "ReduceProd"}
    | {"Add", "Sub", "Mul", "Div", "Neg", "CastLike"}
    | shapes.SHAPE_OPS
)


_SAME_SHAPE_UNARY = frozenset(
    {"Identity", "Cast", "Relu", "Neg", "Sigmoid", "Tanh", "Abs", "Sqrt", "Reciprocal", "Exp", "Erf"}
)
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
_LAYOUT_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze", "MatMul", "Gemm", "Split", "GlobalAveragePool"})


def node_label(n: gs.Node) -> str:
    """A node's name, or ``Op(first output)`` for the unnamed nodes some exporters write."""
    if n.name:
        return n.name
    return f"{n.op}({n.outputs[0].name if n.outputs else ''})"


def onnx_dtype(np_or_onnx: object) -> int | None:
    """ONNX ``TensorProto`` element type for a numpy dtype (or pass an int through)."""
    if np_or_onnx is None:
        return None
    if isinstance(np_or_onnx, int):
        return np_or_onnx
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(np_or_onnx)))
    except (TypeError, KeyError, ValueError):
        return None


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


@dataclass
class GraphView:
    """One (sub)graph with its op-type index and pending rewrites."""

    graph: gs.Graph
    path: str  # "main" or "main/Loop_3:body"
    parent: GraphView | None
    nodes_by_op: dict[str, list[gs.Node]] = field(default_factory=dict)
    output_ids: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)
    inserted: dict[int, list[gs.Node]] = field(default_factory=dict)
    maybe_dead: set[int] = field(default_factory=set)

    position: dict[int, int] = field(default_factory=dict)

    def index(self) -> None:
        self.nodes_by_op = {}
        self.position = {}
        for i, node in enumerate(self.graph.nodes):
            self.nodes_by_op.setdefault(node.op, []).append(node)
            self.position[id(node)] = i
        self.output_ids = {id(t) for t in self.graph.outputs}


class ModelGraph:
    """An imported model plus the indexes every pass uses."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph: gs.Graph = _import_quietly(model)
        # Dead nodes would read tensors a rewrite removes; drop them (the model is only
        # exported when something was rewritten).
        if _has_dead_nodes(self.graph):
            self.graph.cleanup(remove_unused_graph_inputs=False)
        self.views: list[GraphView] = []
        self._node_view: dict[int, GraphView] = {}
        self._const_cache: dict[int, np.ndarray | None] = {}
        self._dtype_cache: dict[int, int] = {}
        self._derived: dict[int, tuple[Dim, ...] | None] = {}
        inits = {t.name for t in model.graph.initializer}
        self._overridable = {i.name for i in model.graph.input if i.name in inits}
        self._shape_table: dict[str, tuple[int, tuple[Dim, ...] | None]] | None = None
        self._names: set[str] | None = None
        self._counter = 0
        # Detached nodes (kept alive until flushed, so their ids stay unique) and the tensors
        # whose consumer lists still name them.
        self._detached: dict[int, gs.Node] = {}
        self._stale: dict[int, gs.Tensor] = {}
        self.reindex()

    # -- structure ----------------------------------------------------------
    def reindex(self) -> None:
        """(Re)build the per-graph indexes; call after a pass committed its rewrites."""
        self.views = []
        self._node_view = {}
        self._loop_invariant: dict[int, gs.Tensor] = {}  # body input id -> the outer initial value
        stack: list[tuple[gs.Graph, str, GraphView | None]] = [(self.graph, "main", None)]
        while stack:
            g, path, parent = stack.pop()
            view = GraphView(graph=g, path=path, parent=parent)
            view.index()
            self.views.append(view)
            for node in g.nodes:
                self._node_view[id(node)] = view
                for attr_name, value in node.attrs.items():
                    for sub in _attr_graphs(value):
                        label = node.name or node.op
                        stack.append((sub, f"{path}/{label}:{attr_name}", view))
                        if node.op == "Loop" and not node.domain and attr_name == "body":
                            self._loop_invariant.update(_loop_invariants(node, sub))
        self._all_output_ids = set().union(*(v.output_ids for v in self.views))
        self._const_cache.clear()
        self._derived.clear()
        self._dtype_cache.clear()

    def view_of(self, node: gs.Node) -> GraphView | None:
        return self._node_view.get(id(node))

    def node_count(self) -> int:
        return sum(len(v.graph.nodes) for v in self.views)

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        """An output of the main graph or of any body."""
        return id(tensor) in self._all_output_ids

    # -- constants ----------------------------------------------------------
    def const_value(self, tensor: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
        """The constant value of ``tensor`` if it is one (initializer, Constant node, Identity of those)."""
        key = id(tensor)
        if key in self._const_cache:
            return self._const_cache[key]
        value: np.ndarray | None = None
        if isinstance(tensor, gs.Constant) and tensor.name in self._overridable:
            # An initializer that is also a graph input is only a default the caller may
            # override at run time (IR >= 4): not a constant.
            self._const_cache[key] = None
            return None
        if isinstance(tensor, gs.Constant):
            from onnx_graphsurgeon.ir.tensor import LazyValues

            vals = getattr(tensor, "_values", None)
            try:
                if isinstance(vals, LazyValues):
                    # Read the initializer without letting onnx-graphsurgeon keep the array: a
                    # still-lazy Constant is exported as its original TensorProto, not re-encoded.
                    value = _lazy_array(vals)
                    if vals.nbytes > _BIG_TENSOR:
                        return value  # not cached: no second copy of a big weight
                else:
                    value = np.asarray(tensor.values)
            except Exception:  # unloadable (e.g. external data not loaded)
                value = None
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
        self._const_cache[key] = value
        return value

    def _fold(self, node: gs.Node, depth: int) -> np.ndarray | None:
        """Value of a small node applied to constants: what exporters put around eps/gamma, and
        the ``N`` of an unbiased variance computed from ``Shape`` (static dims only)."""
        op = node.op
        if op == "Gather" and _is_shape_gather(node):
            value = self._fold_shape_gather(node, depth)
            return value if value is not None else shapes.fold(self, node, depth)
        if op in shapes.SHAPE_OPS:
            return shapes.fold(self, node, depth)
        return self._fold_rest(node, depth)

    def _fold_shape_gather(self, node: gs.Node, depth: int) -> np.ndarray | None:
        """Gather(Shape(t), i): needs only the gathered dims to be static."""
        idx = self.const_value(node.inputs[1], depth + 1)
        shape = self.shape(node.inputs[0].inputs[0].inputs[0])
        if idx is None or shape is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        try:
            picked = np.asarray(shape, dtype=object)[idx.astype(np.int64)]
        except (IndexError, ValueError):
            return None
        flat = list(np.asarray(picked, dtype=object).reshape(-1))
        if not all(isinstance(d, (int, np.integer)) for d in flat):
            return None
        return np.asarray(np.asarray(picked, dtype=object).astype(np.int64))

    def _fold_rest(self, node: gs.Node, depth: int) -> np.ndarray | None:
        op = node.op
        if op in ("Add", "Sub", "Mul", "Div"):
            if len(node.inputs) != 2:
                return None
            a = self.const_value(node.inputs[0], depth + 1)
            b = self.const_value(node.inputs[1], depth + 1)
            if a is None or b is None or a.size > 4096 or b.size > 4096 or a.dtype != b.dtype:
                return None
            with np.errstate(all="ignore"):
                if op == "Div":
                    if a.dtype.kind in "iu":
                        return None  # integer division semantics differ; not needed here
                    return np.divide(a, b)
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
        src = self.const_value(node.inputs[0], depth + 1)
        if src is None or src.size > 1 << 22:
            return None
        try:
            if op == "Identity":
                return src
            if op == "CastLike" and len(node.inputs) == 2:
                to = self.dtype(node.inputs[1])
                ok = to in FLOAT_TYPES and to != onnx.TensorProto.BFLOAT16 and src.dtype.kind in "fiu"
                return src.astype(np_dtype(to)) if ok else None  # type: ignore[arg-type]
            if op == "Neg":
                return None if src.dtype.kind not in "if" else np.negative(src)
            if op == "Cast":
                to = int(node.attrs.get("to", 0))
                if to not in FLOAT_TYPES or to == onnx.TensorProto.BFLOAT16 or src.dtype.kind not in "fiu":
                    return None
                return src.astype(np_dtype(to))
            if op == "Flatten":
                axis = int(node.attrs.get("axis", 1))
                axis = axis + src.ndim if axis < 0 else axis
                outer = int(np.prod(src.shape[:axis])) if axis > 0 else 1
                return src.reshape(outer, -1)
            if op == "Reshape" and len(node.inputs) > 1:
                shape = self.const_value(node.inputs[1], depth + 1)
                if shape is None or int(node.attrs.get("allowzero", 0)):
                    return None
                dims = [int(d) for d in shape.reshape(-1)]
                dims = [src.shape[i] if d == 0 else d for i, d in enumerate(dims)]
                return src.reshape(dims)
            if op == "ReduceProd":
                if len(node.inputs) > 1 or ("axes" in node.attrs and src.ndim != 1):
                    return None
                out = np.asarray(np.prod(src), dtype=src.dtype)
                return out if not int(node.attrs.get("keepdims", 1)) else out.reshape((1,) * src.ndim)
            if op in ("Unsqueeze", "Squeeze"):
                if len(node.inputs) > 1:
                    axes_v = self.const_value(node.inputs[1], depth + 1)
                    axes = None if axes_v is None else [int(a) for a in axes_v.reshape(-1)]
                else:
                    axes = [int(a) for a in node.attrs.get("axes", [])] or None
                if op == "Unsqueeze":
                    if not axes:
                        return None
                    out_rank = src.ndim + len(axes)
                    return np.expand_dims(src, tuple(a + out_rank if a < 0 else a for a in axes))
                return np.squeeze(src, axis=None if axes is None else tuple(axes))
        except (ValueError, TypeError):
            return None
        return None

    def const_shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        """Shape of a constant without loading its data (None if ``tensor`` is not constant)."""
        src = self.constant_source(tensor)
        if isinstance(src, gs.Constant):
            return tuple(int(d) for d in src.shape)
        val = self.const_value(tensor) if src.inputs and src.inputs[0].op == "Constant" else None
        return None if val is None else tuple(val.shape)

    def constant_source(self, tensor: gs.Tensor) -> gs.Tensor:
        """Follow Identity nodes back to the tensor that holds the constant."""
        t = tensor
        for _ in range(8):
            if t.inputs and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
                t = t.inputs[0].inputs[0]
            else:
                break
        return t

    # -- types and shapes ---------------------------------------------------
    def dtype(self, tensor: gs.Tensor, _depth: int = 0) -> int | None:
        """ONNX element type of ``tensor``: annotations, then local propagation, then shape inference."""
        key = id(tensor)
        if key in self._dtype_cache:
            return self._dtype_cache[key]
        dt = self._dtype(tensor, _depth)
        if dt is not None:
            self._dtype_cache[key] = dt
        return dt

    def _dtype(self, tensor: gs.Tensor, _depth: int = 0) -> int | None:
        if isinstance(tensor, gs.Constant):
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
                        if isinstance(inp, gs.Constant):
                            return onnx_dtype(inp.dtype)
                dt = self.dtype(node.inputs[0], _depth + 1)
                if dt:
                    return dt
        entry = self.shape_table().get(tensor.name)
        return entry[0] if entry else None

    def shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """Shape of ``tensor`` (ints, symbolic names or None per dim), or None if the rank is unknown."""
        if isinstance(tensor, gs.Constant):
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
            self._derived[key] = self._derived_shape(tensor)
        return self._derived[key]

    def _derived_shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """What shape inference could not say, from the producer: a Reshape's (shape-derived)
        target, a same-shape unary op's input, or the broadcast of an elementwise op's inputs."""
        p = self.producer(tensor)
        if p is None or p.domain or not p.inputs:
            return None
        if p.op == "Reshape" and len(p.inputs) > 1:
            target = shapes.reshape_target(self, p)
            if target is not None:
                return tuple(shapes.as_int(m) for m in target)
            length = self.shape(p.inputs[1])  # at least the rank: the target's own length
            return (None,) * length[0] if length and len(length) == 1 and isinstance(length[0], int) else None
        if p.op in _SAME_SHAPE_UNARY:
            return self.shape(p.inputs[0])
        if p.op in _LAYOUT_OPS:
            return self._layout_shape(p, tensor)
        if p.op not in _BROADCASTING:
            return None
        parts = [self.shape(t) for t in p.inputs]
        if any(q is None for q in parts):
            return None
        rank = max(len(q) for q in parts)  # type: ignore[arg-type]
        out: list[Dim] = []
        for pos in range(rank, 0, -1):
            sizes = {q[-pos] for q in parts if len(q) >= pos}  # type: ignore[index, arg-type]
            out.append(_broadcast_dim(sizes))
        return tuple(out)

    def _layout_shape(self, p: gs.Node, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """Output shape of Transpose / Squeeze / Unsqueeze / MatMul / Gemm / Split from its input's."""
        src = self.shape(p.inputs[0])
        if src is None:
            return None
        r = len(src)
        if p.op == "GlobalAveragePool":
            return (*src[:2], *([1] * (r - 2))) if r >= 3 else None
        if p.op == "Transpose":
            perm = p.attrs.get("perm") or list(range(r))[::-1]
            return tuple(src[int(i)] for i in perm) if len(perm) == r else None
        if p.op in ("MatMul", "Gemm"):
            w = self.shape(p.inputs[1])
            if w is None or r < 1 or len(w) < 1 or (p.op == "Gemm" and (r != 2 or len(w) != 2)):
                return None
            if p.op == "Gemm":
                rows = src[1] if p.attrs.get("transA", 0) else src[0]
                return (rows, w[0] if p.attrs.get("transB", 0) else w[1])
            return (*src[:-1], w[-1]) if r >= 2 and len(w) == 2 else None
        axes = self._int_list(p, "axes" if p.op != "Split" else "split")
        if p.op == "Squeeze":
            if axes is None:
                return None
            drop = {a + r if a < 0 else a for a in axes}
            return tuple(d for i, d in enumerate(src) if i not in drop)
        if p.op == "Unsqueeze":
            if axes is None:
                return None
            n = r + len(axes)
            put = {a + n if a < 0 else a for a in axes}
            it = iter(src)
            return tuple(1 if i in put else next(it) for i in range(n))
        axis = int(p.attrs.get("axis", 0))  # Split
        axis = axis + r if axis < 0 else axis
        k = next((i for i, o in enumerate(p.outputs) if o is tensor), None)
        if k is None or not 0 <= axis < r:
            return None
        size: Dim = axes[k] if axes is not None and k < len(axes) else None
        if axes is None and isinstance(src[axis], int) and src[axis] % len(p.outputs) == 0:
            size = src[axis] // len(p.outputs)
        return (*src[:axis], size, *src[axis + 1 :])

    def _int_list(self, node: gs.Node, attr: str) -> list[int] | None:
        """A list-of-ints argument given as an attribute (old opsets) or a constant second input."""
        if len(node.inputs) > 1 and node.inputs[1].name:
            v = self.const_value(node.inputs[1])
            return None if v is None else [int(a) for a in v.reshape(-1)]
        value = node.attrs.get(attr)
        return None if value is None else [int(a) for a in value]

    def shape_table(self) -> dict[str, tuple[int, tuple[Dim, ...] | None]]:
        """Name -> (elem_type, dims) from ONNX shape inference, computed at most once."""
        if self._shape_table is None:
            self._shape_table = _infer_shapes(self.model)
        return self._shape_table

    # -- naming ---------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        if self._names is None:
            # Every name a node or tensor already uses: tensors are defined by node outputs,
            # graph inputs and initializers (those in use are node inputs).
            names: set[str] = set()
            for v in self.views:
                g = v.graph
                names.update(t.name for t in g.inputs)
                for n in g.nodes:
                    names.add(n.name)
                    for t in n.outputs:
                        names.add(t.name)
                    for t in n.inputs:
                        if isinstance(t, gs.Constant):
                            names.add(t.name)
            # Export restores the original graph inputs (an overridable initializer may be
            # unused); other unused initializers are not exported, so their names are free.
            names.update(i.name for i in self.model.graph.input)
            self._names = names
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    # -- rewriting ------------------------------------------------------------
    def replace(
        self, view: GraphView, nodes: Iterable[gs.Node], anchor: gs.Node, new_nodes: list[gs.Node]
    ) -> None:
        """Schedule ``nodes`` for removal and ``new_nodes`` for insertion where ``anchor`` stands.

        The caller rewires tensors when it builds ``new_nodes`` (they produce the
        old output tensors) after detaching the old producers with :meth:`detach`.
        ``anchor`` must be the last of ``nodes`` in graph order, so every input
        of the new nodes is defined before that position.
        """
        for n in nodes:
            view.removed.add(id(n))
        view.inserted.setdefault(id(anchor), []).extend(new_nodes)

    def detach(self, nodes: Iterable[gs.Node]) -> None:
        """Disconnect ``nodes`` from their tensors, remembering producers that may now be dead.

        The nodes leave their input tensors' consumer lists at the next :meth:`flush` (commit
        calls it), in one pass per tensor: removing k of a shared constant's n consumers one by
        one would cost k*n (and onnx-graphsurgeon's list removal compares nodes with ``==``).
        """
        nodes = list(nodes)
        region = {id(n) for n in nodes}
        for n in nodes:
            self._unlink(n, region)

    def _unlink(self, node: gs.Node, region: set[int] | None = None) -> None:
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
                owner = self._node_view.get(id(src))
                if owner is not None:
                    owner.maybe_dead.add(id(src))
            self._stale[id(t)] = t
        self._detached[id(node)] = node
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
        if not self._stale:
            return
        gone = self._detached
        for t in self._stale.values():
            consumers = t.outputs
            kept = [c for c in consumers if id(c) not in gone]
            if len(kept) != len(consumers):
                list.clear(consumers)
                list.extend(consumers, kept)
        self._stale = {}
        self._detached = {}

    def commit(self) -> int:
        """Apply scheduled rewrites in every graph, in one linear sweep each. Returns graphs changed."""
        changed = 0
        self.flush()
        for view in reversed(self.views):  # bodies before the graphs that own them
            if not view.removed and not view.inserted and not view.maybe_dead:
                continue
            changed += 1
            new_list: list[gs.Node] = []
            for node in view.graph.nodes:
                key = id(node)
                if key in view.inserted:
                    new_list.extend(view.inserted[key])
                if key in view.removed:
                    continue
                new_list.append(node)
            # Producers left without consumers by a rewrite go too, transitively (reverse order:
            # a node's consumers come after it, so one backward sweep settles everything).
            if view.maybe_dead:
                dead: set[int] = set()
                gone = self._detached
                for node in reversed(new_list):
                    key = id(node)
                    if key not in view.maybe_dead or not node.outputs:
                        continue
                    if any(
                        id(t) in view.output_ids or any(id(c) not in gone for c in t.outputs)
                        for t in node.outputs
                    ):
                        continue
                    dead.add(key)
                    self._unlink(node)
                new_list = [n for n in new_list if id(n) not in dead]
            view.graph.nodes = new_list
            view.removed = set()
            view.inserted = {}
            view.maybe_dead = set()
        self.flush()
        if changed:
            self.reindex()
        return changed

    def export(self, *, consume: bool = False) -> onnx.ModelProto:
        """A new ModelProto: every field of the original, with the rewritten graph.

        Large initializers are exported as data-less stubs and filled in afterwards with
        one copy each: onnx-graphsurgeon's exporter would otherwise copy every weight twice
        (graph, then model), which for a multi-GB model means four copies in memory.

        ``consume=True`` (the caller owns the imported ModelProto and will not use it again)
        builds the result *in* that ModelProto instead: its large main-graph initializers stay
        where they are, byte for byte, and are never copied (about 0.5 s and one copy of the
        weights per 2 GB on these machines). The ModelGraph is spent afterwards.
        """
        from onnx_graphsurgeon.ir.tensor import LazyValues

        swapped: list[tuple[gs.Constant, object]] = []
        originals: dict[str, onnx.TensorProto] = {}
        seen: set[int] = set()
        for view in self.views:
            readers = [node.inputs for node in view.graph.nodes] + [view.graph.outputs]
            for tensors in readers:
                for t in tensors:
                    if not isinstance(t, gs.Constant) or id(t) in seen:
                        continue
                    seen.add(id(t))
                    vals = t._values
                    if not isinstance(vals, LazyValues):
                        continue
                    proto = vals.tensor
                    if isinstance(proto, onnx.TensorProto) and tensor_nbytes(proto) > _BIG_TENSOR:
                        stub = onnx.TensorProto(
                            name=proto.name, data_type=proto.data_type, dims=list(proto.dims)
                        )
                        swapped.append((t, vals))
                        originals[proto.name] = proto
                        t._values = LazyValues(stub)
        try:
            out = _export_quickly(self.graph)
        finally:
            for t, vals in swapped:
                t._values = vals
        if len(self.views) > 1:
            _restore_outer_initializers(out.graph, self.model.graph)
        main_big: set[str] = set()
        if originals and consume:
            main_ids = {id(t) for t in self.model.graph.initializer if t.name in originals}
            main_big = {n for n, t in originals.items() if id(t) in main_ids}
        if originals:
            for gi, g in enumerate(iter_graphs(out.graph)):
                for init in g.initializer:
                    src = originals.get(init.name)
                    if gi == 0 and init.name in main_big:
                        continue  # stays where it is, in the consumed model
                    if src is not None and init.ByteSize() < 4096:
                        init.CopyFrom(src)
        if main_big:  # the original ModelProto, rewritten to equal the export
            _transplant_graph(self.model.graph, out.graph, main_big)
            return self.model
        graph_doc = self.model.graph.doc_string
        copy_fields(out, self.model, {"graph"}, clear=True)
        out.graph.doc_string = graph_doc
        # Graph inputs are the model's interface: keep them exactly (onnx-graphsurgeon drops
        # initializers that double as inputs, i.e. overridable defaults, from the input list).
        del out.graph.input[:]
        out.graph.input.extend(self.model.graph.input)
        return out


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


def _lazy_array(lazy: object) -> np.ndarray:
    """The (read-only) value of an initializer onnx-graphsurgeon has not loaded yet.

    ``raw_data`` of a common type is viewed in place (``numpy_helper.to_array`` costs ~10 us
    per tensor, 0.2 s on 20k small weights); anything else goes through onnx-graphsurgeon.
    """
    proto = getattr(lazy, "tensor", None)
    if (
        isinstance(proto, onnx.TensorProto)
        and proto.data_location != TP.EXTERNAL
        and proto.data_type in _RAW_DTYPES
        and proto.HasField("raw_data")
    ):
        dt = _RAW_DTYPES[proto.data_type]
        dims = tuple(int(d) for d in proto.dims)
        raw = proto.raw_data
        if len(raw) == math.prod(dims) * dt.itemsize:
            return np.frombuffer(raw, dtype=dt).reshape(dims).astype(dt.newbyteorder("="), copy=False)
    return np.asarray(lazy.load())  # type: ignore[attr-defined]


def _restore_outer_initializers(out: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Put the original main graph's initializers back in the main graph, once each.

    onnx-graphsurgeon exports a body's outer-scope constants as initializers of the body itself
    (and drops them from the main graph when only bodies read them), so a weight read by the
    main graph and a Loop body, or by two branches, came out two or three times. Initializers
    the original bodies declared themselves stay where they are.
    """
    graphs = list(iter_graphs(original))
    main_names = {t.name for t in original.initializer}
    body_names = {t.name for g in graphs[1:] for t in g.initializer}
    outer = main_names - body_names
    have = {t.name for t in out.initializer}
    for g in list(iter_graphs(out))[1:]:
        inits = g.initializer
        for i in reversed(range(len(inits))):
            name = inits[i].name
            if name not in outer:
                continue
            if name not in have:
                out.initializer.append(inits[i])
                have.add(name)
            del inits[i]


def _transplant_graph(dst: onnx.GraphProto, src: onnx.GraphProto, keep: set[str]) -> None:
    """Make ``dst`` (the input's main graph) equal to ``src`` (the export, with data-less stubs
    for the initializers named in ``keep``), leaving ``dst``'s own ``keep`` initializers in place.

    Graph inputs and doc string stay as they are (the export keeps the originals anyway); every
    other field is replaced. Initializer order: the kept ones first (in their old order), then
    the rest.
    """
    inits = dst.initializer
    wanted = {t.name for t in src.initializer}
    kept = [i for i, t in enumerate(inits) if t.name in keep and t.name in wanted]
    # Delete the runs between kept entries, from the back: one memmove per run.
    end = len(inits)
    for i in reversed(kept):
        if i + 1 < end:
            del inits[i + 1 : end]
        end = i
    if end > 0:
        del inits[0:end]
    seen = {t.name for t in inits}
    inits.extend(t for t in src.initializer if t.name not in seen)
    copy_fields(dst, src, {"initializer", "input", "doc_string"}, clear=True)


def _broadcast_dim(sizes: set[Dim]) -> Dim:
    """One broadcast dim: a static size > 1 wins over 1 and unknown (the others must be 1 or it);
    a symbolic size only when every input is known; 1 when all are 1."""
    ints = {d for d in sizes if isinstance(d, int) and d != 1}
    if ints:
        return ints.pop() if len(ints) == 1 else None
    if None in sizes:
        return None
    named = sizes - {1}
    return 1 if not named else named.pop() if len(named) == 1 else None


def _loop_invariants(loop: gs.Node, body: gs.Graph) -> dict[int, gs.Tensor]:
    """Loop-carried states the body returns unchanged (output ``i - 1`` is input ``i``, through
    Identity nodes), each mapped to the Loop's initial value for it."""
    out: dict[int, gs.Tensor] = {}
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


def _is_shape_gather(node: gs.Node) -> bool:
    src = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    return src is not None and src.op == "Shape"


def _has_dead_nodes(graph: gs.Graph) -> bool:
    """True if some node's outputs are all unused (a dead region always has such a sink)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        outs = {id(t) for t in g.outputs}
        for node in g.nodes:
            if node.outputs and all(not t.outputs and id(t) not in outs for t in node.outputs):
                return True
            for value in node.attrs.values():
                stack.extend(_attr_graphs(value))
    return False


def _attr_graphs(value: object) -> list[gs.Graph]:
    """The graphs an imported attribute value holds (a body, or a list of them)."""
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, gs.Graph)]


def _norm_dim(d: object) -> Dim:
    if isinstance(d, (int, np.integer)):
        return int(d) if int(d) >= 0 else None
    if isinstance(d, str) and d:
        return d
    return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if isinstance(v, onnx.TensorProto):
            return onnx.numpy_helper.to_array(v)
        return None
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
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tt.elem_type, tuple(dims)


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


def _import_quietly(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` without its per-tensor verbose message, with a faster node importer.

    onnx-graphsurgeon formats "Tensor ... was not generated during shape inference" for every
    tensor without a value_info (all intermediates of an exported model) before checking the
    log level: about 4 us per tensor, 0.4 s on 110k nodes. Its node importer builds each node
    and tensor through ``__setattr__`` hooks and synchronised-list callbacks, about 20 us per
    node; :func:`_fast_import_node` builds the same objects directly (see its docstring).
    """
    from onnx_graphsurgeon.importers import onnx_importer
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
    from onnx_graphsurgeon.logger import G_LOGGER

    patches: list[tuple[object, str, object]] = [(G_LOGGER, "verbose", lambda *args, **kwargs: None)]
    if _fast_import_ok():
        _IMPORT_SAW_SUBGRAPH[0] = False
        patches += [
            (OnnxImporter, "import_node", staticmethod(_fast_import_node)),
            (gs.Graph, "_merge_subgraph_functions", _merge_if_needed),
            (onnx_importer, "get_numpy_type", _memoized(onnx_importer.get_numpy_type)),
        ]
    with _patched(patches):
        return gs.import_onnx(model)


_MISSING = object()


@contextlib.contextmanager
def _patched(patches: list[tuple[object, str, object]]) -> Iterator[None]:
    """Set ``owner.name = value`` for each patch while the block runs, then put back exactly what
    was there (an attribute the owner did not hold itself, e.g. a method, is removed again)."""
    saved = []
    for owner, name, value in patches:
        saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


def _memoized(fn: Callable[[object], object]) -> Callable[[object], object]:
    """``fn`` with its results remembered per argument (onnx-graphsurgeon's get_numpy_type rebuilds
    onnx's list of all tensor types on every call: twice per initializer)."""
    cache: dict[object, object] = {}

    def wrapper(arg: object) -> object:
        try:
            return cache[arg]
        except KeyError:
            cache[arg] = out = fn(arg)
            return out
        except TypeError:  # unhashable
            return fn(arg)

    return wrapper


# Set by _fast_import_node when a node holds a graph (If / Loop / Scan body).
_IMPORT_SAW_SUBGRAPH = [False]


def _merge_if_needed(graph: gs.Graph) -> None:
    """``Graph._merge_subgraph_functions``, skipped where it has nothing to do.

    onnx-graphsurgeon calls it for every Graph it builds; it walks every node looking for
    subgraphs (~0.15 s on 110k nodes) to share one function list between a graph, its bodies
    and its functions. With no local functions and no node holding a graph imported so far,
    there is nothing to share and the walk is skipped.
    """
    if graph.functions or _IMPORT_SAW_SUBGRAPH[0]:
        _STOCK_MERGE(graph)


def _export_quickly(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=False)`` with :func:`_fast_export_node` for its nodes
    (and without its opset_import, which the caller sets from the original model)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    fast = _fast_import_ok()
    with _patched([(OnnxExporter, "export_node", staticmethod(_fast_export_node))] if fast else []):
        # opset_imports given: onnx-graphsurgeon would otherwise crawl every node for domains;
        # ModelGraph.export replaces the model-level fields with the original's anyway.
        return gs.export_onnx(graph, do_type_check=False, opset_imports=[])


def _fast_export_node(node: gs.Node) -> onnx.NodeProto:
    """Same NodeProto as ``OnnxExporter.export_node`` (``helper.make_node`` + exported attributes)."""
    proto = onnx.NodeProto(
        op_type=node.op,
        input=[t.name for t in node.inputs],
        output=[t.name for t in node.outputs],
    )
    if node.name:
        proto.name = node.name
    if node.domain is not None:
        proto.domain = node.domain
    if node.attrs:
        proto.attribute.extend(_OnnxExporter.export_attributes(node.attrs))
    return proto


# The object layout _fast_import_node writes directly; checked against the installed
# onnx-graphsurgeon once (the stock importer is used when it differs).
_NODE_FIELDS = ("op", "name", "attrs", "inputs", "outputs", "domain")
_VARIABLE_FIELDS = ("name", "inputs", "outputs", "dtype", "shape", "type")
_LIST_FIELDS = ("parent_obj", "field_name")
_FAST_OK: bool | None = None
# The call signatures the fast importer/exporter stand in for (onnx-graphsurgeon 0.5.x / 0.6.x).
_IMPORT_NODE_PARAMS = ("onnx_node", "tensor_map", "subgraph_tensor_map", "opset", "import_domains")
_IMPORT_ATTRS_PARAMS = ("onnx_attributes", "tensor_map", "subgraph_tensor_map", "opset", "import_domains")


def _params(fn: object) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(fn).parameters)  # type: ignore[arg-type]


_new = object.__new__
_new_list = list.__new__
_SyncList = _OnnxImporter = _OnnxExporter = _STOCK_MERGE = None  # bound by _fast_import_ok


def _fast_import_ok() -> bool:
    global _FAST_OK, _SyncList, _OnnxImporter, _OnnxExporter, _STOCK_MERGE
    if _FAST_OK is None:
        try:
            from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
            from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
            from onnx_graphsurgeon.util.misc import SynchronizedList

            _SyncList, _OnnxImporter, _OnnxExporter = SynchronizedList, OnnxImporter, OnnxExporter
            _STOCK_MERGE = gs.Graph.__dict__["_merge_subgraph_functions"]

            node, var = gs.Node("Identity"), gs.Variable("t")
            node.inputs.append(var)
            _FAST_OK = (
                tuple(vars(node)) == _NODE_FIELDS
                and tuple(vars(var)) == _VARIABLE_FIELDS
                and tuple(vars(node.inputs)) == _LIST_FIELDS
                and type(node.inputs) is SynchronizedList
                and type(var.outputs) is SynchronizedList
                and list.__getitem__(var.outputs, 0) is node
                and node.inputs.field_name == "outputs"
                and var.outputs.field_name == "inputs"
                and _params(OnnxImporter.import_node) == _IMPORT_NODE_PARAMS
                and _params(OnnxImporter.import_attributes) == _IMPORT_ATTRS_PARAMS
                and _params(OnnxExporter.export_node) == ("node",)
                and _params(OnnxExporter.export_attributes) == ("attrs",)
                and _params(_STOCK_MERGE) == ("self",)
            )
        except Exception:  # pragma: no cover - a very different onnx-graphsurgeon
            _FAST_OK = False
    return _FAST_OK


def _synced(parent: object, field_name: str, items: list) -> list:
    out = _new_list(_SyncList)
    if items:
        list.extend(out, items)
    out.parent_obj = parent
    out.field_name = field_name
    return out


def _new_variable(name: str) -> gs.Variable:
    var = _new(gs.Variable)
    var.__dict__.update(
        name=name,
        inputs=_synced(var, "outputs", []),
        outputs=_synced(var, "inputs", []),
        dtype=None,
        shape=None,
        type="tensor_type",
    )
    return var


def new_node(
    op: str,
    name: str,
    attrs: dict[str, object],
    inputs: list[gs.Tensor],
    outputs: list[gs.Tensor],
    domain: str | None = None,
) -> gs.Node:
    """``gs.Node(op, name, attrs, inputs, outputs, domain)``, built directly when the layout allows."""
    if not _fast_import_ok():
        return gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=outputs, domain=domain)
    return _assemble_node(op, name, attrs, list(inputs), list(outputs), domain)


def _assemble_node(
    op: str,
    name: str,
    attrs: dict[str, object],
    inputs: list[gs.Tensor],
    outputs: list[gs.Tensor],
    domain: str | None,
) -> gs.Node:
    """A gs.Node with its fields set directly; each tensor's producer/consumer list gets the node
    exactly as ``SynchronizedList.extend`` would put it there. ``inputs``/``outputs`` are taken over."""
    node = _new(gs.Node)
    node.__dict__.update(
        op=op,
        name=name,
        attrs=attrs,
        inputs=_synced(node, "outputs", inputs),
        outputs=_synced(node, "inputs", outputs),
        domain=domain,
    )
    for t in inputs:
        list.append(t.outputs, node)
    for t in outputs:
        list.append(t.inputs, node)
    return node


def _named_tensors(names: Iterable[str], local: dict, outer: dict | None) -> list[gs.Tensor]:
    """onnx-graphsurgeon's lookup: this graph's map, then the outer scope's; an empty name is a
    fresh unnamed Variable; any other unknown name a new Variable registered in ``local``."""
    out = []
    for name in names:
        t = local.get(name)
        if t is None and outer is not None:
            t = outer.get(name)
        if t is None:
            if name:
                t = local[name] = _new_variable(name)
            else:
                t = _new_variable("")
        out.append(t)
    return out


def _fast_import_node(
    onnx_node: onnx.NodeProto,
    tensor_map: dict,
    subgraph_tensor_map: dict,
    opset: int | None,
    import_domains: object,
) -> gs.Node:
    """Same result as ``OnnxImporter.import_node`` (onnx-graphsurgeon 0.5/0.6), built directly.

    Tensors are looked up in the subgraph's map, then (inputs only) the outer scope's; an empty
    name is a fresh unnamed Variable; any other unknown name becomes a Variable registered in the
    subgraph's map. Attributes go through onnx-graphsurgeon's own importer. The node and its
    tensors' producer/consumer lists are filled exactly as ``SynchronizedList.extend`` would.
    ``tests/test_graph_import.py`` compares the two importers on every shipped model.
    """
    inputs = _named_tensors(onnx_node.input, subgraph_tensor_map, tensor_map)
    outputs = _named_tensors(onnx_node.output, subgraph_tensor_map, None)  # never from outside
    if len(onnx_node.attribute):
        attrs = _OnnxImporter.import_attributes(
            onnx_node.attribute, tensor_map, subgraph_tensor_map, opset, import_domains
        )
        if not _IMPORT_SAW_SUBGRAPH[0] and any(_attr_graphs(v) for v in attrs.values()):
            _IMPORT_SAW_SUBGRAPH[0] = True
    else:
        attrs = OrderedDict()
    domain = onnx_node.domain if onnx_node.HasField("domain") else None
    return _assemble_node(onnx_node.op_type, onnx_node.name, attrs, inputs, outputs, domain)
