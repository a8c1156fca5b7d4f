"""Tests for lnfuse.io: bad inputs, path safety, atomic writes and external-data round trips."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lnfuse.io as lio
from lnfuse.errors import InputError

OPSET = [helper.make_opsetid("", 17)]


# --------------------------------------------------------------------------- helpers


def make_model(n: int = 1024, extra_init: bool = False) -> onnx.ModelProto:
    """y = (x + w) * s with a 4 KB initializer w (n float32) and a small s."""
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32) * 0.5, "w")
    s = numpy_helper.from_array(np.full([n], 2.0, dtype=np.float32), "s")
    inits = [w, s]
    nodes = [
        helper.make_node("Add", ["x", "w"], ["t"], name="add"),
        helper.make_node("Mul", ["t", "s"], ["y"], name="mul"),
    ]
    if extra_init:
        # A tensor stored in a typed field, with an explicit data_location.
        b = helper.make_tensor("b", TensorProto.FLOAT, [n], np.linspace(0, 1, n, dtype=np.float32).tolist())
        b.data_location = TensorProto.DEFAULT
        inits.append(b)
        nodes.append(helper.make_node("Add", ["y", "b"], ["z"], name="addb"))
        out = "z"
    else:
        out = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def make_if_model() -> onnx.ModelProto:
    """An If whose branches use outer-scope tensors and hold their own initializers."""
    then_w = numpy_helper.from_array(np.arange(16, dtype=np.float32), "then_w")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["t", "then_w"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [16])],
        [then_w],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["t", "x"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [16])],
    )
    w = numpy_helper.from_array(np.ones(16, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "w"], ["t"], name="pre"),
            helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [16]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
        [w],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def branch(m: onnx.ModelProto, name: str) -> onnx.GraphProto:
    """The branch subgraph `name` of the If node of make_if_model()."""
    (attr,) = [a for a in m.graph.node[1].attribute if a.name == name]
    return attr.g


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under directory (symlinks by target text)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = lio.file_digest(p)
        else:
            out[rel] = "dir"
    return out


def check_error(err: pytest.ExceptionInfo[InputError], *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert "Traceback" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert err.value.exit_code == 2
    return msg


def set_external(tensor: TensorProto, location: str, offset: int = 0, length: int | None = None) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = tensor.external_data.add()
        e.key, e.value = k, v


def external_model_file(
    directory: Path, location: str, *, offset: int = 0, length: int | None = 4096, data: bytes | None = None
) -> Path:
    """model.onnx in directory whose initializer 'w' points at `location` (written by hand)."""
    m = make_model()
    w = m.graph.initializer[0]
    raw = w.raw_data
    set_external(w, location, offset, length)
    path = write_bytes(directory / "model.onnx", m.SerializeToString())
    if data is not None:
        write_bytes(directory / location, data)
    else:
        assert len(raw) == 4096
    return path


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# --------------------------------------------------------------------------- bad input files


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        lio.load_model(tmp_path / "nope.onnx")
    check_error(err, "nope.onnx", "no such file")
    assert list(tmp_path.iterdir()) == []


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "adir.onnx"
    d.mkdir()
    with pytest.raises(InputError) as err:
        lio.load_model(d)
    check_error(err, "adir.onnx", "directory")


def test_path_below_a_file(tmp_path: Path) -> None:
    f = write_bytes(tmp_path / "file", b"x")
    with pytest.raises(InputError) as err:
        lio.load_model(f / "model.onnx")
    check_error(err, "model.onnx", "no such file")


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("empty.onnx", b"", "empty"),
        ("text.onnx", b"hello, this is not a model\nsecond line\n", "not a valid ONNX model"),
        ("random.onnx", np.random.default_rng(0).bytes(3000), "not"),
        ("nograph.onnx", b"\x08\x08", "no graph"),
        ("textproto.onnx", b'ir_version: 8\ngraph { name: "g" }\n', "not"),
    ],
)
def test_not_a_model(tmp_path: Path, name: str, data: bytes, needle: str) -> None:
    path = write_bytes(tmp_path / name, data)
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, name, needle)
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError):
        lio.has_external_data(path)


def test_truncated_protobuf(tmp_path: Path) -> None:
    data = make_model().SerializeToString()
    assert len(data) > 8000
    path = write_bytes(tmp_path / "trunc.onnx", data[: len(data) // 2])
    # onnx itself fails with a raw protobuf DecodeError (with its own text), not a clean message.
    with pytest.raises(Exception):  # noqa: B017
        onnx.load(str(path))
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, "trunc.onnx", "truncated")
    assert snapshot(tmp_path) == before


def test_truncated_at_every_cut_is_an_input_error(tmp_path: Path) -> None:
    data = make_model(n=8).SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(len(data)):
        # Some cuts fall on a field boundary and parse; the missing graph/opset_import gives them away.
        path.write_bytes(data[:cut])
        with pytest.raises(InputError) as err:
            lio.load_model(path)
        check_error(err, "cut.onnx")
    path.write_bytes(data)
    assert lio.load_model(path).SerializeToString() == data


# --------------------------------------------------------------------------- external data


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = external_model_file(tmp_path, "weights.bin")
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, "model.onnx", "'w'", "weights.bin", "does not exist")
    assert snapshot(tmp_path) == before


def test_external_data_written_by_onnx_loads(tmp_path: Path) -> None:
    expected = [t.raw_data for t in make_model().graph.initializer]
    path = tmp_path / "m.onnx"
    # (onnx.save_model converts the model it is given to external data in place)
    onnx.save_model(make_model(), str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    assert lio.has_external_data(path)
    before = snapshot(tmp_path)
    loaded = lio.load_model(path)
    assert not lio.has_external_data(loaded)
    assert [t.raw_data for t in loaded.graph.initializer] == expected
    assert snapshot(tmp_path) == before


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(file) if not isinstance(file, int) else f"fd:{file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return opened


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABSOLUTE"])
def test_location_outside_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    secret = write_bytes(tmp_path / "secret.bin", b"\x01" * 4096)
    if location == "ABSOLUTE":
        location = str(secret)
    model_dir = tmp_path / "models"
    # Two tensors: 's' is fine and stored inside, 'w' points outside. Nothing may be read.
    m = make_model()
    w, s = m.graph.initializer
    write_bytes(model_dir / "ok.bin", s.raw_data)
    set_external(s, "ok.bin", 0, 4096)
    set_external(w, location, 0, 4096)
    path = write_bytes(model_dir / "model.onnx", m.SerializeToString())
    before = snapshot(tmp_path)
    opened = _record_opens(monkeypatch)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    monkeypatch.undo()
    msg = check_error(err, "model.onnx", "'w'", "refusing")
    assert ("absolute" in msg) if os.path.isabs(location) else ("outside" in msg)
    assert [Path(p).name for p in opened] == ["model.onnx"]
    assert snapshot(tmp_path) == before
    # also refused when the data is not loaded
    with pytest.raises(InputError):
        lio.load_model(path, load_external_data=False)


def test_location_symlink_escaping_is_refused(tmp_path: Path) -> None:
    write_bytes(tmp_path / "secret.bin", b"\x01" * 4096)
    model_dir = tmp_path / "models"
    path = external_model_file(model_dir, "link.bin")
    os.symlink(tmp_path / "secret.bin", model_dir / "link.bin")
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, "link.bin", "outside")
    assert snapshot(tmp_path) == before


def test_location_symlink_inside_is_fine(tmp_path: Path) -> None:
    raw = make_model().graph.initializer[0].raw_data
    path = external_model_file(tmp_path, "link.bin")
    write_bytes(tmp_path / "real" / "w.bin", raw)
    os.symlink(tmp_path / "real" / "w.bin", tmp_path / "link.bin")
    m = lio.load_model(path)
    assert m.graph.initializer[0].raw_data == raw


@pytest.mark.parametrize(
    ("offset", "length", "needle"),
    [(10**6, 4096, "beyond"), (4000, 4096, "beyond"), (10**6, None, "beyond"), (0, 100, "need 4096")],
)
def test_offset_or_length_bad(tmp_path: Path, offset: int, length: int | None, needle: str) -> None:
    path = external_model_file(tmp_path, "w.bin", offset=offset, length=length, data=b"\0" * 4096)
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, "model.onnx", "'w'", needle)
    assert snapshot(tmp_path) == before


def test_external_data_location_is_a_directory(tmp_path: Path) -> None:
    path = external_model_file(tmp_path, "wdir")
    (tmp_path / "wdir").mkdir()
    with pytest.raises(InputError) as err:
        lio.load_model(path)
    check_error(err, "wdir", "not a regular file")


def test_model_in_subfolder_with_data_in_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_model().graph.initializer[0].raw_data
    model_dir = tmp_path / "a" / "b"
    external_model_file(model_dir, "data/w.bin", offset=8, length=4096, data=b"\xff" * 8 + raw)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    model, path = lio.load("a/b/model.onnx")
    assert path == Path("a/b/model.onnx")
    assert model.graph.initializer[0].raw_data == raw
    assert not model.graph.initializer[0].external_data
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert lio.has_external_data("a/b/model.onnx")
    assert snapshot(tmp_path) == before


def test_load_returns_model_as_is() -> None:
    m = make_model()
    got, path = lio.load(m)
    assert got is m and path is None
    with pytest.raises(InputError):
        lio.load(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- structure


def _graph_model(nodes, inputs=("x",), outputs=("y",), inits=()) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in outputs],
        [numpy_helper.from_array(np.ones(4, np.float32), n) for n in inits],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def test_cyclic_graph(tmp_path: Path) -> None:
    m = _graph_model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="start"),
            helper.make_node("Add", ["a", "c"], ["b"], name="n1"),
            helper.make_node("Relu", ["b"], ["c"], name="n2"),
            helper.make_node("Relu", ["b"], ["y"], name="out"),
        ]
    )
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    msg = check_error(err, "cycle", "'n1'", "'n2'")
    assert "'start'" not in msg and "'out'" not in msg
    # A cyclic model file still loads (load does not validate), and is left untouched.
    path = write_bytes(tmp_path / "cyc.onnx", m.SerializeToString())
    before = snapshot(tmp_path)
    with pytest.raises(InputError):
        lio.validate_structure(lio.load_model(path))
    assert snapshot(tmp_path) == before


def test_self_loop() -> None:
    m = _graph_model([helper.make_node("Add", ["x", "y"], ["y"], name="self")])
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    check_error(err, "cycle", "'self'")


def test_out_of_order_but_acyclic_is_fine() -> None:
    m = _graph_model(
        [
            helper.make_node("Relu", ["b"], ["y"], name="last"),
            helper.make_node("Relu", ["a"], ["b"], name="middle"),
            helper.make_node("Relu", ["x"], ["a"], name="first"),
        ]
    )
    lio.validate_structure(m)


@pytest.mark.parametrize(
    ("nodes", "inits", "needles"),
    [
        (
            [
                helper.make_node("Relu", ["x"], ["y"], name="a"),
                helper.make_node("Neg", ["x"], ["y"], name="b"),
            ],
            (),
            ("duplicate", "'y'", "'a'", "'b'"),
        ),
        (
            [helper.make_node("Relu", ["x"], ["x"], name="a"), helper.make_node("Neg", ["x"], ["y"])],
            (),
            ("'x'", "graph input"),
        ),
        (
            [helper.make_node("Add", ["x", "w"], ["w"], name="a"), helper.make_node("Neg", ["w"], ["y"])],
            ("w",),
            ("'w'", "initializer"),
        ),
        ([helper.make_node("Split", ["x"], ["y", "y"], name="s", num_outputs=2)], (), ("'y'", "twice")),
    ],
)
def test_duplicate_names(nodes, inits, needles) -> None:  # type: ignore[no-untyped-def]
    m = _graph_model(nodes, inits=inits)
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    check_error(err, *needles)


def test_duplicate_initializer_and_inputs() -> None:
    with pytest.raises(InputError, match="duplicate initializer"):
        lio.validate_structure(_graph_model([helper.make_node("Add", ["x", "w"], ["y"])], inits=("w", "w")))
    with pytest.raises(InputError, match="duplicate graph input"):
        lio.validate_structure(_graph_model([helper.make_node("Relu", ["x"], ["y"])], inputs=("x", "x")))
    # an initializer that is also a graph input (a default value) is legal
    lio.validate_structure(
        _graph_model([helper.make_node("Add", ["x", "w"], ["y"])], inputs=("x", "w"), inits=("w",))
    )


def test_no_outputs_and_undefined_tensors() -> None:
    with pytest.raises(InputError) as err:
        lio.validate_structure(_graph_model([helper.make_node("Relu", ["x"], ["y"])], outputs=()))
    check_error(err, "no outputs")
    with pytest.raises(InputError) as err:
        lio.validate_structure(_graph_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="a")]))
    check_error(err, "'ghost'", "'a'")
    with pytest.raises(InputError) as err:
        lio.validate_structure(_graph_model([helper.make_node("Relu", ["x"], ["z"])]))
    check_error(err, "graph output 'y'")
    # optional inputs left empty are fine
    lio.validate_structure(_graph_model([helper.make_node("Clip", ["x", "", ""], ["y"])]))


def test_if_with_outer_scope_references_passes(tmp_path: Path) -> None:
    m = make_if_model()
    lio.validate_structure(m)
    assert lio.checker_problem(m) is None
    # nodes out of order: the If (whose branches use 't') comes first
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    lio.validate_structure(m)


def test_cycle_through_subgraph_implicit_input() -> None:
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["late"], ["o1"])],
        "then",
        [],
        [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["o2"])],
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["r"], name="if", then_branch=then_g, else_branch=else_g),
            helper.make_node("Relu", ["r"], ["late"], name="after"),
            helper.make_node("Relu", ["late"], ["y"], name="out"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    m = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    check_error(err, "cycle", "'if'", "'after'")


def test_subgraph_errors_name_the_subgraph() -> None:
    m = make_if_model()
    # a branch node redefines the outer name 't' (not SSA across scopes; the onnx checker refuses it too)
    branch(m, "then_branch").node[0].output[0] = "t"
    branch(m, "then_branch").output[0].name = "t"
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    check_error(err, "'t'", "outer graph", "subgraph", "'if'")
    m = make_if_model()
    branch(m, "else_branch").node[0].input[0] = "nowhere"
    with pytest.raises(InputError) as err:
        lio.validate_structure(m)
    check_error(err, "'nowhere'", "subgraph 'else_branch'")


def test_loop_with_outer_scope_passes() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "x"], ["v_out"]),  # x comes from the outer graph
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4]),
        ],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [trip, cond],
    )
    m = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    lio.validate_structure(m)
    assert lio.checker_problem(m) is None


def test_long_chain_is_linear_and_iterative() -> None:
    n = 30_000
    names = ["x"] + [f"t{i}" for i in range(n - 1)] + ["y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]], name=f"n{i}") for i in range(n)]
    m = _graph_model(nodes[::-1])  # reversed order: still a DAG
    start = time.perf_counter()
    lio.validate_structure(m)
    assert time.perf_counter() - start < 30  # generous: only guards against quadratic blowups
    # close the chain into a cycle
    m.graph.node[-1].input[0] = "y"
    with pytest.raises(InputError, match="cycle"):
        lio.validate_structure(m)


def test_checker_problem_is_one_line() -> None:
    m = _graph_model([helper.make_node("NoSuchOp", ["x"], ["y"])])
    problem = lio.checker_problem(m)
    assert problem and "\n" not in problem and "NoSuchOp" in problem
    assert lio.checker_problem(make_model()) is None


def test_checker_runs_in_memory_without_a_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full check reads a temporary file; where none can be written it checks the bytes in
    memory, with the same answers."""

    def no_room(*_: object, **__: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio.tempfile, "TemporaryDirectory", no_room)
    bad = _graph_model([helper.make_node("NoSuchOp", ["x"], ["y"])])
    assert lio.whole_model_problem(make_model(), 1 << 30) == (True, None)
    checked, problem = lio.whole_model_problem(bad, 1 << 30)
    assert checked and problem and "NoSuchOp" in problem and "\n" not in problem
    assert lio.whole_model_problem(make_model(), 10) == (False, None)  # too big for one piece


# --------------------------------------------------------------------------- output paths


def test_default_output_path() -> None:
    assert lio.default_output_path("d/model.onnx") == Path("d/model.ln.onnx")
    assert lio.default_output_path(Path("d/m.v2.ONNX")) == Path("d/m.v2.ln.onnx")
    assert lio.default_output_path("d/model") == Path("d/model.ln.onnx")
    assert lio.default_output_path("d/model.pb") == Path("d/model.pb.ln.onnx")


def test_resolve_output_default_and_in_place(tmp_path: Path) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())
    assert lio.resolve_output_path(inp, None) == tmp_path / "model.ln.onnx"
    assert lio.resolve_output_path(inp, None, in_place=True) == inp
    assert lio.resolve_output_path(inp, inp, in_place=True) == inp
    assert lio.resolve_output_path(inp, tmp_path / "other.onnx") == tmp_path / "other.onnx"
    assert lio.resolve_output_path(None, tmp_path / "other.onnx") == tmp_path / "other.onnx"
    with pytest.raises(InputError) as err:
        lio.resolve_output_path(None, None)
    check_error(err, "no output path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the write probe left nothing


def test_output_equals_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())
    digest = lio.file_digest(inp)
    monkeypatch.chdir(tmp_path)
    for out in (inp, "model.onnx", "./sub/../model.onnx", str(inp)):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError) as err:
            lio.resolve_output_path(inp, out)
        check_error(err, "refusing to overwrite the input", "--in-place")
    assert lio.file_digest(inp) == digest


def test_output_equals_input_via_symlink_and_hardlink(tmp_path: Path) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())
    os.symlink(inp, tmp_path / "link.onnx")
    os.link(inp, tmp_path / "hard.onnx")
    (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    before = snapshot(tmp_path)
    for out in (tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "dirlink" / "model.onnx"):
        with pytest.raises(InputError) as err:
            lio.resolve_output_path(inp, out)
        check_error(err, "refusing to overwrite the input")
    # also when the input is given through the link
    with pytest.raises(InputError):
        lio.resolve_output_path(tmp_path / "link.onnx", inp)
    assert snapshot(tmp_path) == before


def test_output_onto_input_external_data_is_refused(tmp_path: Path) -> None:
    inp = lio.save_model(make_model(), tmp_path / "model.onnx", external_data=True, size_threshold=0)
    data = tmp_path / "model.onnx.data"
    write_bytes(tmp_path / "x.onnx.data", b"unrelated")
    os.symlink(data, tmp_path / "y.onnx.data")
    os.link(data, tmp_path / "z.onnx.data")
    before = snapshot(tmp_path)
    # the output itself, or its <output>.data companion (via a symlink or a hard link), is the input's data
    for out, named in (
        (data, "model.onnx.data"),
        (tmp_path / "y.onnx", "y.onnx.data"),
        (tmp_path / "z.onnx", "z.onnx.data"),
    ):
        with pytest.raises(InputError) as err:
            lio.resolve_output_path(inp, out)
        check_error(err, named, "external data of the input")
    assert lio.resolve_output_path(inp, tmp_path / "x.onnx") == tmp_path / "x.onnx"
    assert lio.resolve_output_path(inp, None, in_place=True) == inp
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("rel", "needle"),
    [("afile/out.onnx", "not a directory"), ("missing/out.onnx", "does not exist"), ("adir", "directory")],
)
def test_output_location_unusable(tmp_path: Path, rel: str, needle: str) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())
    write_bytes(tmp_path / "afile", b"plain file")
    (tmp_path / "adir").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        lio.resolve_output_path(inp, tmp_path / rel)
    check_error(err, needle)
    with pytest.raises(InputError):
        lio.save_model(make_model(), tmp_path / rel)
    assert snapshot(tmp_path) == before


def test_output_dir_not_writable_by_access_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())
    monkeypatch.setattr(lio.os, "access", lambda *a, **k: False)
    with pytest.raises(InputError) as err:
        lio.resolve_output_path(inp, tmp_path / "x.onnx")
    check_error(err, "not writable")


def test_output_dir_write_probe_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = write_bytes(tmp_path / "model.onnx", make_model().SerializeToString())

    def no_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(lio.tempfile, "mkstemp", no_space)
    with pytest.raises(InputError) as err:
        lio.resolve_output_path(inp, tmp_path / "x.onnx")
    check_error(err, "x.onnx", os.strerror(errno.EROFS))


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("fail_at", ["fsync", "write", "replace"])
def test_save_disk_full_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool, fail_at: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    m = make_model()
    before_bytes = m.SerializeToString()

    def enospc(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail_at == "fsync":
        monkeypatch.setattr(lio.os, "fsync", enospc)
    elif fail_at == "replace":
        calls = {"n": 0}
        real_replace = os.replace

        def replace_then_fail(src, dst):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == (2 if external else 1):  # fail on the model file's rename
                enospc()
            return real_replace(src, dst)

        monkeypatch.setattr(lio.os, "replace", replace_then_fail)
    else:
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):  # type: ignore[no-untyped-def]
                self.f = f

            def write(self, data):  # type: ignore[no-untyped-def]
                self.f.write(bytes(data)[: max(1, len(data) // 2)])  # a partial write, then failure
                enospc()

            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(self.f, name)

            def __enter__(self):  # type: ignore[no-untyped-def]
                return self

            def __exit__(self, *exc):  # type: ignore[no-untyped-def]
                return self.f.__exit__(*exc)

        monkeypatch.setattr(lio.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(InputError) as err:
        lio.save_model(m, out_dir / "model.ln.onnx", external_data=external, size_threshold=0)
    monkeypatch.undo()
    check_error(err, "model.ln.onnx", os.strerror(errno.ENOSPC))
    assert list(out_dir.iterdir()) == []
    assert m.SerializeToString() == before_bytes


def test_failed_save_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_bytes(tmp_path / "out.onnx", b"previous content")

    def enospc(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lio.os, "fsync", enospc)
    with pytest.raises(InputError):
        lio.save_model(make_model(), out)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_plain_and_permissions(tmp_path: Path) -> None:
    m = make_model()
    before = m.SerializeToString()
    out = lio.save_model(m, tmp_path / "plain.onnx")
    assert out == tmp_path / "plain.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]
    assert out.read_bytes() == before
    assert not lio.has_external_data(out)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_external_round_trip(tmp_path: Path) -> None:
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    m = make_model(extra_init=True)
    original = {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}
    before = m.SerializeToString()
    src = lio.save_model(m, src_dir / "model.onnx", external_data=True, size_threshold=0)
    assert m.SerializeToString() == before  # the in-memory model is unchanged
    assert sorted(p.name for p in src_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert lio.has_external_data(src)
    # onnx's own loader reads what we wrote
    ref = onnx.load(str(src))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in ref.graph.initializer} == original
    onnx.checker.check_model(str(src), full_check=True)

    src_snapshot = snapshot(src_dir)
    loaded = lio.load_model(src)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == original
    w = next(t for t in loaded.graph.initializer if t.name == "w")
    assert w.raw_data == next(t for t in m.graph.initializer if t.name == "w").raw_data

    loaded_bytes = loaded.SerializeToString()
    dst = lio.save_model(
        loaded, dst_dir / "model.ln.onnx", external_data=lio.has_external_data(src), size_threshold=0
    )
    assert loaded.SerializeToString() == loaded_bytes
    assert sorted(p.name for p in dst_dir.iterdir()) == ["model.ln.onnx", "model.ln.onnx.data"]
    stored = onnx.load(str(dst), load_external_data=False)
    for t in stored.graph.initializer:
        assert {e.key: e.value for e in t.external_data}["location"] == "model.ln.onnx.data"
    again = lio.load_model(dst)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in again.graph.initializer} == original
    assert snapshot(src_dir) == src_snapshot

    x = np.linspace(-1, 1, 1024, dtype=np.float32)
    (want,) = run_ort(src, {"x": x})
    (got,) = run_ort(dst, {"x": x})
    np.testing.assert_array_equal(want, got)


def test_external_threshold_and_subgraph_initializers(tmp_path: Path) -> None:
    m = make_if_model()
    before = m.SerializeToString()
    out = lio.save_model(m, tmp_path / "if.onnx", external_data=True, size_threshold=64)
    assert m.SerializeToString() == before
    stored = onnx.load(str(out), load_external_data=False)
    then_w = branch(stored, "then_branch").initializer[0]
    assert then_w.data_location == TensorProto.EXTERNAL  # 64 bytes: subgraph initializers are covered
    small = lio.save_model(m, tmp_path / "small.onnx", external_data=True, size_threshold=65)
    assert not lio.has_external_data(small)
    assert not (tmp_path / "small.onnx.data").exists()  # nothing qualified: no data file
    loaded = lio.load_model(out)
    x = np.arange(16, dtype=np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_array_equal(run_ort(out, feeds)[0], run_ort(small, feeds)[0])
    assert (
        branch(loaded, "then_branch").initializer[0].raw_data
        == branch(m, "then_branch").initializer[0].raw_data
    )


def test_external_encoding_matches_protobuf_when_nothing_qualifies(tmp_path: Path) -> None:
    for m in (make_model(extra_init=True), make_if_model()):
        m.metadata_props.add(key="k", value="v")
        out = lio.save_model(m, tmp_path / "m.onnx", external_data=True, size_threshold=10**9)
        assert out.read_bytes() == m.SerializeToString()
        assert not (tmp_path / "m.onnx.data").exists()


def test_auto_external_for_large_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = make_model()
    monkeypatch.setattr(lio, "_AUTO_EXTERNAL_BYTES", 1000)
    out = lio.save_model(m, tmp_path / "big.onnx")
    assert lio.has_external_data(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    # checker_problem goes through a temporary external-data copy for such models
    assert lio.checker_problem(m) is None
    bad = _graph_model([helper.make_node("NoSuchOp", ["x"], ["y"])], inits=("w",))
    assert "NoSuchOp" in (lio.checker_problem(bad) or "")


def test_save_refuses_unloaded_external_data(tmp_path: Path) -> None:
    path = external_model_file(tmp_path, "w.bin", data=make_model().graph.initializer[0].raw_data)
    unloaded = lio.load_model(path, load_external_data=False)
    with pytest.raises(InputError) as err:
        lio.save_model(unloaded, tmp_path / "out.onnx")
    check_error(err, "out.onnx", "'w'", "external data")
    assert not (tmp_path / "out.onnx").exists()


def test_in_place_overwrite_with_external_data(tmp_path: Path) -> None:
    m = make_model()
    path = lio.save_model(m, tmp_path / "model.onnx", external_data=True, size_threshold=0)
    loaded = lio.load_model(path)
    out = lio.resolve_output_path(path, None, in_place=True)
    lio.save_model(loaded, out, external_data=True, size_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    again = lio.load_model(path)
    assert [t.raw_data for t in again.graph.initializer] == [t.raw_data for t in m.graph.initializer]


def test_file_digest(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 5)
    p = write_bytes(tmp_path / "blob", data)
    assert lio.file_digest(p) == hashlib.sha256(data).hexdigest()


def test_external_tensor_without_location_is_one_line_error(tmp_path: Path) -> None:
    """data_location=EXTERNAL with no ``location`` key (so the file lacks that word, and the
    external-data walk is skipped): the checker still refuses it in one line; with
    --allow-invalid nothing half-loaded is ever written."""
    from click.testing import CliRunner

    from lnfuse.cli import main

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "offset", "0"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "noloc.onnx"
    src.write_bytes(model.SerializeToString())
    assert b"location" not in src.read_bytes()
    before = src.read_bytes()
    for extra in ([], ["--allow-invalid"]):
        out = tmp_path / "out.onnx"
        res = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), *extra])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("lnfuse: error:") and res.output.count("\n") == 1
        assert "location" in res.output
        assert not out.exists()
    assert src.read_bytes() == before
