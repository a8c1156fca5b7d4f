"""lnfuse.ir builds the graph onnx-graphsurgeon's importer builds, and writes back only what changed.

onnx-graphsurgeon (its public ``import_onnx``) is the reference: on every shipped model and on
hand-built corner cases (subgraphs reading outer-scope tensors, empty optional inputs/outputs,
custom domains, a Constant node with a tensor attribute, an initializer that is also an input,
local functions), both importers must give the same nodes in the same order, the same tensor
sharing, the same producer / consumer lists, the same constants and annotated dtypes / shapes.
An export with nothing rewritten keeps every NodeProto and initializer byte for byte, and
building the index never modifies the caller's model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import lnfuse
from lnfuse import ir
from lnfuse.graph import ModelGraph

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "models").rglob("*.onnx"))


def _gs_bodies(node: gs.Node) -> list[gs.Graph]:
    out: list[gs.Graph] = []
    for value in node.attrs.values():
        out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, gs.Graph)]
    return out


def _ir_bodies(node: ir.Node) -> list[ir.Graph]:
    return [b for _, b in ir.bodies(node)]


def _graphs(graph: object, bodies: Callable[[object], list]) -> Iterator:
    """``graph`` and every body below it, breadth first."""
    queue = [graph]
    while queue:
        g = queue.pop(0)
        yield g
        for node in g.nodes:  # type: ignore[attr-defined]
            queue += bodies(node)


def _dtype(t: object) -> int | None:
    if getattr(t, "type", "tensor_type") != "tensor_type":
        return None  # onnx-graphsurgeon gives a sequence its element type; lnfuse gives it none
    return ir.elem_type(getattr(t, "dtype", None))


def _attr(v: object) -> object:
    if isinstance(v, (gs.Graph, ir.Graph)):
        return "graph"
    if isinstance(v, gs.Constant):
        return ("tensor", np.asarray(v.values).tobytes())
    if isinstance(v, onnx.TensorProto):
        return ("tensor", numpy_helper.to_array(v).tobytes())
    if isinstance(v, list):
        return [_attr(x) for x in v]
    return v


def _describe(graphs: Iterator, is_const: type) -> list:
    """Nodes and tensors with object identity replaced by first-seen order."""
    ids: dict[int, int] = {}

    def ref(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids))

    def tensor(t: object) -> tuple:
        const = isinstance(t, is_const)
        shape = None if t.shape is None else [d if isinstance(d, (int, str)) else None for d in t.shape]
        value = np.asarray(t.values).tobytes() if const else None
        return (
            ref(t),
            t.name,
            const,
            value,
            _dtype(t),
            shape,
            [ref(n) for n in t.inputs],
            [ref(n) for n in t.outputs],
        )

    out: list = []
    for g in graphs:
        out.append(("graph", [tensor(t) for t in g.outputs]))
        for node in g.nodes:
            attrs = sorted((k, _attr(v)) for k, v in node.attrs.items())
            ins = [tensor(t) for t in node.inputs]
            outs = [tensor(t) for t in node.outputs]
            out.append((ref(node), node.op, node.name, node.domain or None, attrs, ins, outs))
    return out


def _assert_same_as_graphsurgeon(model: onnx.ModelProto) -> None:
    theirs = _describe(_graphs(gs.import_onnx(model), _gs_bodies), gs.Constant)
    ours = _describe(_graphs(ir.import_model(model), _ir_bodies), ir.Constant)
    assert ours == theirs


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT / "models")) for p in SHIPPED])
def test_shipped_models_import_as_graphsurgeon_does(path: Path) -> None:
    _assert_same_as_graphsurgeon(onnx.load(str(path)))


def _corner_model() -> onnx.ModelProto:
    """Outer-scope reads from a Loop body and an If branch, empty optional names, a custom domain,
    a Constant node with a tensor attribute, value_info, an initializer that is also an input."""
    f = TensorProto.FLOAT
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t_out"], name="then_add")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", f, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["x", "w"], ["e_out"], name="else_sub")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", f, [2, 3])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("Add", ["carry", "x"], ["carry_out"], name="body_add"),
            helper.make_node("Identity", ["carry_out"], ["scan_out"], name="body_scan"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carry", f, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carry_out", f, [2, 3]),
            helper.make_tensor_value_info("scan_out", f, [2, 3]),
        ],
    )
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["c"],
            name="const",
            value=numpy_helper.from_array(np.ones((2, 3), np.float32), "c_val"),
        ),
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("If", ["flag"], ["if_out"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "a"], ["loop_carry", "loop_scan"], name="loop", body=body),
        helper.make_node("Clip", ["if_out", "", "w"], ["clipped"], name="clip_empty_min"),
        helper.make_node("Dropout", ["clipped"], ["dropped", ""], name="dropout_empty_mask"),
        helper.make_node("MyOp", ["dropped"], ["custom"], name="custom", domain="my.domain", alpha=0.5),
        helper.make_node("Mul", ["custom", "loop_carry"], ["y"], name="mul"),
        helper.make_node("Mul", ["y", "y"], ["y2"]),  # unnamed node
    ]
    graph = helper.make_graph(
        nodes,
        "corners",
        [
            helper.make_tensor_value_info("x", f, [2, 3]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("w", f, [2, 3]),
        ],
        [helper.make_tensor_value_info("y2", f, [2, 3]), helper.make_tensor_value_info("loop_scan", f, None)],
        [
            numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "w"),
            numpy_helper.from_array(np.asarray(3, np.int64), "trip"),
        ],
        value_info=[helper.make_tensor_value_info("a", f, [2, 3])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
        ir_version=8,
    )


def test_corner_cases_import_as_graphsurgeon_does() -> None:
    _assert_same_as_graphsurgeon(_corner_model())


def _twice_function() -> onnx.FunctionProto:
    """A local function ``local.Twice(a) = a + a``."""
    return helper.make_function(
        "local",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )


def test_local_functions_import_as_graphsurgeon_does() -> None:
    model = _corner_model()
    model.functions.append(_twice_function())
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Twice", ["y2"], ["y3"], name="call", domain="local"))
    _assert_same_as_graphsurgeon(model)


def _mark_all_dirty(mg: ModelGraph) -> None:
    for view in mg.views:
        view.graph.dirty = True


@pytest.mark.parametrize("consume", [False, True], ids=["copy", "consume"])
def test_unchanged_export_keeps_every_proto(consume: bool) -> None:
    """Every graph rewritten with nothing changed: the same bytes (unused initializers aside)."""
    model = _corner_model()
    before = model.SerializeToString()
    mg = ModelGraph(model)
    _mark_all_dirty(mg)
    out = mg.export(consume=consume)
    assert (out is model) == consume
    if not consume:
        assert model.SerializeToString() == before  # the caller's model is untouched
    ref = onnx.ModelProto.FromString(before)
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in ref.graph.node]
    assert [t.SerializeToString() for t in out.graph.initializer] == [
        t.SerializeToString() for t in ref.graph.initializer
    ]


def _relu_chain(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"r{i}") for i in range(n)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("consume", [False, True], ids=["copy", "consume"])
def test_export_writes_any_new_node_list(seed: int, consume: bool) -> None:
    """Whatever a rewrite leaves (nodes gone, new ones anywhere, kept ones reordered), the exported
    node list is exactly the graph's: written in place when that is possible, rebuilt otherwise."""
    rng = np.random.default_rng(seed)
    model = _relu_chain(int(rng.integers(1, 12)))
    before = {n.name: n.SerializeToString() for n in model.graph.node}
    mg = ModelGraph(model)
    g = mg.graph
    kept = [n for n in g.nodes if rng.random() < 0.6]
    if seed % 4 == 0:
        rng.shuffle(kept)  # out of import order (a kept node moving back is rebuilt)
    new_list: list[ir.Node] = []
    for i, node in enumerate(kept):
        for j in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
            t = ir.Variable(f"new{i}_{j}", np.float32)
            new_list.append(ir.Node("Neg", f"neg{i}_{j}", None, [node.inputs[0]], [t]))
        new_list.append(node)
    if rng.random() < 0.5:
        new_list.append(ir.Node("Neg", "tail", None, [g.inputs[0]], [ir.Variable("tail_out", np.float32)]))
    g.nodes = new_list
    g.dirty = True
    out = mg.export(consume=consume)
    assert [n.name for n in out.graph.node] == [n.name for n in new_list]
    for proto in out.graph.node:
        if proto.name in before:
            assert proto.SerializeToString() == before[proto.name]
        else:
            assert proto.op_type == "Neg" and list(proto.output) == [proto.output[0]]


def test_index_never_modifies_the_input() -> None:
    for path in SHIPPED[:40]:
        model = onnx.load(str(path))
        before = model.SerializeToString()
        mg = ModelGraph(model)
        for view in mg.views:
            for node in view.graph.nodes:
                assert isinstance(node.attrs, dict)  # decoded
        assert model.SerializeToString() == before, path


def test_dead_nodes_are_dropped_only_from_a_rewritten_model() -> None:
    model = onnx.load(str(ROOT / "models" / "exported" / "torch_layernorm_2d_opset14.onnx"))
    x = model.graph.input[0].name
    model.graph.node.extend(
        [helper.make_node("Relu", [x], ["dead1"]), helper.make_node("Neg", ["dead1"], ["dead2"])]
    )
    unchanged = lnfuse.optimize(model, rmsnorm=False, verify=False, passes=())
    assert not unchanged.changed and unchanged.model is model
    fused = lnfuse.optimize(model)
    ops = [n.op_type for n in fused.model.graph.node]
    assert ops == ["LayerNormalization"]


def test_threads_optimize_to_the_same_bytes() -> None:
    """Nothing process-global: threads optimizing different models get the sequential bytes."""
    paths = [p for p in SHIPPED if p.parent.name in ("exported", "tf", "paddle")][:8]
    assert len(paths) >= 6
    sequential = [lnfuse.optimize(str(p)).model.SerializeToString() for p in paths]
    results: list[bytes | None] = [None] * len(paths)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = lnfuse.optimize(str(paths[i])).model.SerializeToString()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == sequential


def test_no_third_party_class_is_patched() -> None:
    """The graph layer does not import onnx-graphsurgeon at all."""
    import sys

    graph_src = (ROOT / "lnfuse" / "graph.py").read_text() + (ROOT / "lnfuse" / "ir.py").read_text()
    assert "onnx_graphsurgeon" not in graph_src and "setattr(" not in graph_src
    assert "gc.disable" not in (ROOT / "lnfuse" / "api.py").read_text()
    assert sys.modules.get("lnfuse.graph") is not None


def test_graphsurgeon_graph_in_and_out() -> None:
    """A gs.Graph in (TensorRT pipelines): the result as a ModelProto and as a gs.Graph."""
    model = onnx.load(str(ROOT / "models" / "exported" / "torch_layernorm_2d_opset14.onnx"))
    graph = gs.import_onnx(model)
    n_before = len(graph.nodes)
    result = lnfuse.optimize(graph)
    assert result.changed and isinstance(result.graph, gs.Graph)
    assert [n.op for n in result.graph.nodes] == ["LayerNormalization"]
    assert [n.op_type for n in result.model.graph.node] == ["LayerNormalization"]
    assert len(graph.nodes) == n_before  # the caller's graph is untouched


def test_the_walk_enters_exactly_the_ops_it_evaluates() -> None:
    from lnfuse import matcher

    assert frozenset(matcher._EVALUATORS) == matcher.ALGEBRA_OPS


def test_release_frees_the_graph_without_the_cyclic_gc() -> None:
    """After export, release() cuts the node <-> tensor links, so reference counting alone frees
    every node and tensor (the command line runs with the cyclic GC off); the export is unaffected."""
    import gc
    import weakref

    model = onnx.load(str(ROOT / "models" / "exported" / "transformer_block_opset14.onnx"))
    before = model.SerializeToString()
    mg = ModelGraph(model)
    refs = [weakref.ref(o) for v in mg.views for n in v.graph.nodes for o in (n, *n.inputs, *n.outputs)]
    assert len(refs) > 50
    enabled = gc.isenabled()
    gc.disable()
    try:
        out = mg.export(consume=False)
        mg.release()
        assert not mg.views
        alive = sum(r() is not None for r in refs)
    finally:
        if enabled:
            gc.enable()
    assert alive == 0
    assert out.SerializeToString() == before  # nothing was rewritten: the same model


def test_commit_frees_the_removed_nodes_without_the_cyclic_gc() -> None:
    """Commit lets go of the nodes it removes: reference counting alone frees them (a removed
    node still naming its view, whose op-type index names it, would be a cycle keeping the whole
    graph; a detached Constant kept by the detach bookkeeping would keep it too)."""
    import gc
    import weakref

    from lnfuse.passes import DEFAULT_PASSES

    from lnfuse.pipeline import PassContext
    from lnfuse.report import Report

    model = onnx.load(str(ROOT / "models" / "exported" / "transformer_block_opset14.onnx"))
    mg = ModelGraph(model)
    refs = [weakref.ref(n) for v in mg.views for n in v.graph.nodes]
    enabled = gc.isenabled()
    gc.disable()
    try:
        _mg, changed = DEFAULT_PASSES[0]()(mg, PassContext(report=Report(), verify=False))
        kept = {id(n) for v in mg.views for n in v.graph.nodes}
        removed = [r for r in refs if r() is None or id(r()) not in kept]
        alive = sum(r() is not None for r in removed)
    finally:
        if enabled:
            gc.enable()
    assert changed and len(removed) >= 8
    assert alive == 0


def test_report_records_own_their_strings() -> None:
    """Records copy the names they are given: a report must not keep the graph's own string
    objects (which would pin the graph's memory after release)."""
    from lnfuse.report import AnchorRecord, Group, MatchRecord, RefusalRecord

    def fresh(s: str) -> str:
        return "".join(["", *s])  # built, so not interned or shared

    name, label = fresh("layer.0/ln_out"), fresh("layer.0/ReduceMean")
    m = MatchRecord("LayerNormalization", "p", "main", name, name, (label,), 1e-5, -1, 1, (8,), ())
    r = RefusalRecord("why", (label,), label, "main", "layer-norm")
    a = AnchorRecord("ReduceMean", label, "main", "why")
    g = Group("d", 1, "main", (name,))
    for kept in (m.output, m.input, m.nodes[0], r.nodes[0], r.anchor, a.anchor, g.outputs[0]):
        assert kept in (name, label)
        assert kept is not name and kept is not label


def test_nodes_without_attributes_share_one_read_only_dict() -> None:
    model = onnx.load(str(ROOT / "models" / "exported" / "transformer_block_opset14.onnx"))
    mg = ModelGraph(model)
    bare = [n for v in mg.views for n in v.graph.nodes if not len(n.proto.attribute)]
    assert len(bare) > 10
    assert len({id(n.attrs) for n in bare}) == 1 and bare[0].attrs == {}
    with pytest.raises(TypeError):
        bare[0].attrs["axis"] = 1
    clone = bare[0].clone(bare[0].inputs, [ir.Variable("c")])
    clone.attrs["axis"] = 1  # a clone's attributes are its own
    assert bare[1].attrs == {}


def test_unique_names_avoid_every_name_in_use() -> None:
    """unique_name collects only the names that begin as its base does; what it hands out never
    repeats a node, tensor, initializer or graph input name, nor an earlier answer, whatever the
    bases' lengths."""
    x = helper.make_tensor_value_info("lnfuse_x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Neg", ["lnfuse_x"], ["lnfuse/Neg"], name="lnfuse/Neg_1"),
        helper.make_node("Add", ["lnfuse/Neg", "ln"], ["y"], name="l"),
    ]
    init = numpy_helper.from_array(np.ones(2, np.float32), "ln")
    graph = helper.make_graph(nodes, "g", [x], [y], [init])
    mg = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    used = {"lnfuse_x", "y", "lnfuse/Neg", "lnfuse/Neg_1", "l", "ln"}
    got = [mg.unique_name(b) for b in ("lnfuse/Neg", "lnfuse/Neg", "ln", "l", "lnfuse_x", "lnfuse/Neg", "l")]
    assert not used & set(got)
    assert len(set(got)) == len(got)
    assert got[0] == "lnfuse/Neg_2"  # _1 is a node's name


def test_equal_attributes_are_decoded_once_per_graph() -> None:
    """Nodes of one graph with the same plain attributes share one read-only decoded dict; other
    attributes, and tensor-valued ones, get their own."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m1"], axes=[-1], keepdims=1),
        helper.make_node("ReduceMean", ["x"], ["m2"], axes=[-1], keepdims=1),
        helper.make_node("ReduceMean", ["x"], ["m3"], axes=[-1], keepdims=0),
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Constant", [], ["c2"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Sum", ["m1", "m2", "c1", "c2"], ["s"]),
        helper.make_node("Add", ["s", "m3"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    mg = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    m1, m2, m3, c1, c2 = mg.views[0].graph.nodes[:5]
    assert m1.attrs is m2.attrs and m1.attrs == {"axes": [-1], "keepdims": 1}
    assert m3.attrs is not m1.attrs and m3.attrs["keepdims"] == 0
    assert c1.attrs is not c2.attrs
    with pytest.raises(TypeError):
        m1.attrs["keepdims"] = 0


def test_a_new_node_with_an_old_nodes_tensor_is_written_before_any_slot_moves() -> None:
    """A new node may carry a removed node's tensor attribute (a view into that NodeProto): the
    in-place write-back builds its proto before overwriting the slot the view points into."""
    value = numpy_helper.from_array(np.arange(4, dtype=np.float32), "v")
    nodes = [
        helper.make_node("Constant", [], ["a"], name="c0", value=value),
        helper.make_node("Relu", ["x"], ["b"], name="r1"),
        helper.make_node("Relu", ["b"], ["c"], name="r2"),
        helper.make_node("Add", ["a", "c"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    )
    mg = ModelGraph(model)
    g = mg.graph
    c0, r1, r2, add = g.nodes
    new = ir.Node("Constant", "c_new", {"value": c0.attrs["value"]}, [], [c0.outputs[0]])
    assert not new.self_contained()
    g.nodes = [r1, r2, new, add]  # r1 moves into c0's slot before the new node is written
    g.dirty = True
    out = mg.export(consume=True)
    assert [n.name for n in out.graph.node] == ["r1", "r2", "c_new", "add"]
    got = out.graph.node[2].attribute[0].t
    assert numpy_helper.to_array(got).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out.graph.node[0].SerializeToString() == nodes[1].SerializeToString()
