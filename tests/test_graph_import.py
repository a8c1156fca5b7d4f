"""lnfuse's fast node importer/exporter build the same graph/proto as onnx-graphsurgeon's own.

:func:`lnfuse.graph._fast_import_node` replaces ``OnnxImporter.import_node`` during
:class:`~lnfuse.graph.ModelGraph` construction (it skips per-attribute hooks, about 0.8 s on a
110k-node model). Here both importers run on every shipped model and on hand-built corner cases
(subgraphs reading outer-scope tensors, empty optional inputs/outputs, a tensor produced twice,
custom domains, functions), and the two graphs must agree object for object: the same nodes
with the same fields, the same tensor sharing, the same producer/consumer lists, and a
byte-identical export, from onnx-graphsurgeon's exporter and from lnfuse's faster one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from lnfuse import graph as lgraph

ROOT = Path(__file__).resolve().parent.parent
NODE_FIELDS = ("op", "name", "attrs", "inputs", "outputs", "domain")
SHIPPED = sorted((ROOT / "models" / "fixtures").glob("*.onnx")) + sorted(
    (ROOT / "models" / "exported").glob("*.onnx")
)


def _import(model: onnx.ModelProto, fast: bool) -> gs.Graph:
    saved = lgraph._FAST_OK
    try:
        lgraph._FAST_OK = None if fast else False
        return lgraph._import_quietly(model)
    finally:
        lgraph._FAST_OK = saved


def _graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.nodes:
            for value in node.attrs.values():
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, gs.Graph):
                        stack.append(sub)
    yield from graph.functions


def _describe(graph: gs.Graph) -> list:
    """Every node and tensor reachable from ``graph``, with object identity replaced by first-seen order."""
    ids: dict[int, int] = {}

    def ref(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids))

    def tensor(t: gs.Tensor) -> tuple:
        fields = {k: v for k, v in vars(t).items() if k not in ("inputs", "outputs", "_values")}
        values = None
        if isinstance(t, gs.Constant):
            values = np.asarray(t.values).tobytes()
        return (
            ref(t),
            type(t).__name__,
            sorted((k, repr(v)) for k, v in fields.items()),
            values,
            [ref(n) for n in t.inputs],
            [ref(n) for n in t.outputs],
            type(t.inputs).__name__,
            type(t.outputs).__name__,
        )

    def attr(v: object) -> object:
        if isinstance(v, gs.Graph):
            return ("graph", ref(v))
        if isinstance(v, gs.Tensor):
            return ("tensor", tensor(v))
        if isinstance(v, list):
            return [attr(x) for x in v]
        return repr(v)

    out: list = []
    for g in _graphs(graph):
        out.append(
            (
                "graph",
                ref(g),
                g.name,
                [tensor(t) for t in g.inputs],
                [tensor(t) for t in g.outputs],
                ref(g._functions),  # which graphs share one function list
                [f.unique_id for f in g.functions],
            )
        )
        for node in g.nodes:
            assert sorted(vars(node)) == sorted(NODE_FIELDS)
            out.append(
                (
                    ref(node),
                    node.op,
                    node.name,
                    node.domain,
                    type(node.attrs).__name__,
                    [(k, attr(v)) for k, v in node.attrs.items()],
                    [tensor(t) for t in node.inputs],
                    [tensor(t) for t in node.outputs],
                    type(node.inputs).__name__,
                    node.inputs.field_name,
                    node.inputs.parent_obj is node,
                    node.outputs.field_name,
                    node.outputs.parent_obj is node,
                )
            )
    return out


def _assert_same(model: onnx.ModelProto) -> None:
    fast, stock = _import(model, True), _import(model, False)
    assert _describe(fast) == _describe(stock)
    a = gs.export_onnx(fast, do_type_check=False).SerializeToString()
    b = gs.export_onnx(stock, do_type_check=False).SerializeToString()
    assert a == b
    # and lnfuse's exporter (fast node export) writes the same bytes as onnx-graphsurgeon's,
    # opset_import aside (ModelGraph.export takes that from the original model)
    ours = lgraph._export_quickly(fast)
    assert not ours.opset_import
    theirs = gs.export_onnx(stock, do_type_check=False)
    del theirs.opset_import[:]
    assert ours.SerializeToString() == theirs.SerializeToString()


def test_fast_importer_is_in_use() -> None:
    """On the installed onnx-graphsurgeon the layout check passes, so the fast path is what runs."""
    assert lgraph._fast_import_ok()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_import_identically(path: Path) -> None:
    _assert_same(onnx.load(str(path)))


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


def test_corner_cases_import_identically() -> None:
    _assert_same(_corner_model())


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


def test_function_bodies_import_identically() -> None:
    f = TensorProto.FLOAT
    fn = _twice_function()
    graph = helper.make_graph(
        [helper.make_node("Twice", ["x"], ["y"], name="call", domain="local")],
        "with_function",
        [helper.make_tensor_value_info("x", f, [4])],
        [helper.make_tensor_value_info("y", f, [4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
        ir_version=8,
    )
    _assert_same(model)


def test_layout_mismatch_falls_back_to_stock_importer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A different onnx-graphsurgeon object layout turns the fast path off instead of guessing."""
    monkeypatch.setattr(lgraph, "_FAST_OK", None)
    monkeypatch.setattr(lgraph, "_NODE_FIELDS", ("op", "name"))
    assert not lgraph._fast_import_ok()
    model = _corner_model()
    imported = lgraph._import_quietly(model)
    monkeypatch.setattr(lgraph, "_FAST_OK", False)
    assert _describe(imported) == _describe(_import(model, False))


def test_importer_signature_mismatch_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another onnx-graphsurgeon whose import_node takes other arguments: the stock path is used."""
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    def import_node(onnx_node: object, tensor_map: object, subgraph_tensor_map: object) -> None:
        raise AssertionError("not to be called")

    monkeypatch.setattr(lgraph, "_FAST_OK", None)
    monkeypatch.setattr(OnnxImporter, "import_node", staticmethod(import_node))
    assert not lgraph._fast_import_ok()


def test_functions_and_bodies_import_identically() -> None:
    """A local function and If branches in one model: function lists are shared the same way."""
    model = _corner_model()
    fn = _twice_function()
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Twice", ["y2"], ["y3"], name="call", domain="local"))
    _assert_same(model)


def test_import_and_export_leave_onnx_graphsurgeon_as_they_found_it() -> None:
    """The fast paths patch onnx-graphsurgeon only while they run, and put everything back."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
    from onnx_graphsurgeon.importers import onnx_importer
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
    from onnx_graphsurgeon.logger import G_LOGGER

    def state() -> tuple[object, ...]:
        return (
            OnnxImporter.__dict__["import_node"],
            OnnxExporter.__dict__["export_node"],
            gs.Graph.__dict__["_merge_subgraph_functions"],
            onnx_importer.get_numpy_type,
            "verbose" in vars(G_LOGGER),
        )

    before = state()
    lgraph._export_quickly(_import(_corner_model(), True))
    assert all(a is b for a, b in zip(before, state(), strict=True))
