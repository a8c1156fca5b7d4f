"""Model I/O for lnfuse: safe loading, structural validation and atomic saving.

* :func:`load_model` reads an ONNX file read-only and turns every kind of bad input
  (missing path, directory, empty, not ONNX, truncated, missing or unsafe external
  data) into a one-line :class:`~lnfuse.errors.InputError`.  External data is only
  ever read from inside the model's own directory: absolute locations and locations
  that resolve (symlinks included) outside that directory are refused before any
  byte of external data is read.
* :func:`validate_structure` rejects graphs that are not single-assignment, that are
  cyclic, that use undefined tensors or that have no outputs, in linear time.
* :func:`resolve_output_path` and :func:`save_model` pick and write the output without
  ever overwriting the input by accident and without ever leaving a partial file:
  everything is written to a temporary file in the target directory, fsynced and then
  renamed over the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple, Union

import onnx
from google.protobuf.message import DecodeError, EncodeError, Message
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, numpy_helper

from lnfuse.errors import InputError
from lnfuse.protos import copy_fields, is_repeated, iter_graphs, serialized_below

__all__ = [
    "checker_problem",
    "checker_problem_at",
    "default_output_path",
    "file_digest",
    "has_external_data",
    "load",
    "load_model",
    "resolve_output_path",
    "save_model",
    "validate_structure",
    "whole_model_problem",
]

PathLike = Union[str, "os.PathLike[str]"]

# Protobuf cannot serialize or parse a message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1
# Above this estimated size, save_model(external_data=None) writes external data.
_AUTO_EXTERNAL_BYTES = 1_900_000_000
_CHUNK = 1 << 20
# resolve_output_path looks for the external data files of input models up to this size.
_SCAN_INPUT_BYTES = 256 << 20
# Deepest nesting of subgraphs validate_structure accepts (protobuf itself refuses to
# parse messages nested deeper than 100 levels).
_MAX_SUBGRAPH_DEPTH = 200

_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _one_line(text: object) -> str:
    """Collapse ``text`` to a single line (error messages must be one line)."""
    return " ".join(str(text).split())


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return _one_line(err.strerror)
    return _one_line(err) or type(err).__name__


# --------------------------------------------------------------------------- tensors


def _bits_per_element() -> dict[int, int]:
    table = {
        "FLOAT": 32,
        "UINT8": 8,
        "INT8": 8,
        "UINT16": 16,
        "INT16": 16,
        "INT32": 32,
        "INT64": 64,
        "BOOL": 8,
        "FLOAT16": 16,
        "DOUBLE": 64,
        "UINT32": 32,
        "UINT64": 64,
        "COMPLEX64": 64,
        "COMPLEX128": 128,
        "BFLOAT16": 16,
        "FLOAT8E4M3FN": 8,
        "FLOAT8E4M3FNUZ": 8,
        "FLOAT8E5M2": 8,
        "FLOAT8E5M2FNUZ": 8,
        "FLOAT8E8M0": 8,
        "UINT4": 4,
        "INT4": 4,
        "FLOAT4E2M1": 4,
        "UINT2": 2,
        "INT2": 2,
    }
    out: dict[int, int] = {}
    for name, bits in table.items():
        value = getattr(TensorProto, name, None)
        if isinstance(value, int):
            out[value] = bits
    return out


_BITS = _bits_per_element()


def _expected_nbytes(tensor: TensorProto) -> int | None:
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return None
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    return (numel * bits + 7) // 8


def _attr_tensors(attr: AttributeProto) -> Iterator[TensorProto]:
    if attr.type == AttributeProto.TENSOR:
        yield attr.t
    elif attr.type == AttributeProto.TENSORS:
        yield from attr.tensors
    elif attr.type == AttributeProto.SPARSE_TENSOR:
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    elif attr.type == AttributeProto.SPARSE_TENSORS:
        for sp in attr.sparse_tensors:
            yield sp.values
            yield sp.indices


def _attr_graphs(attr: AttributeProto) -> Iterator[GraphProto]:
    if attr.type == AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == AttributeProto.GRAPHS:
        yield from attr.graphs


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that may hold data: initializers, sparse initializers and
    attribute tensors of the main graph, of all (nested) subgraphs and of the nodes of
    local functions (and their subgraphs).  Iterative, no recursion."""
    node_lists: list = [fn.node for fn in model.functions]
    graphs = [model.graph]
    while graphs or node_lists:
        if graphs:
            g = graphs.pop()
            yield from _graph_tensors(g)
            node_lists.append(g.node)
            continue
        for node in node_lists.pop():
            for attr in node.attribute:
                yield from _attr_tensors(attr)
                graphs.extend(_attr_graphs(attr))


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _tensor_label(tensor: TensorProto) -> str:
    return repr(tensor.name) if tensor.name else "<unnamed>"


# --------------------------------------------------------------------------- loading


def _check_model_file(path: Path) -> os.stat_result:
    shown = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file") from None
    except NotADirectoryError:
        raise InputError(f"{shown}: no such file (a parent of the path is not a directory)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{shown}: cannot access the file: {_os_reason(err)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{shown}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown}: is not a regular file")
    if st.st_size == 0:
        raise InputError(f"{shown}: the file is empty, not an ONNX model")
    if st.st_size > _PROTOBUF_LIMIT:
        raise InputError(
            f"{shown}: the file is {st.st_size} bytes, above the 2 GB protobuf limit; "
            "models this large must keep their weights in external data"
        )
    return st


def _read_proto(path: Path) -> ModelProto:
    """Parse the model file (without external data); InputError on any problem."""
    return _read_proto_flagged(path)[0]


def _read_proto_flagged(path: Path) -> tuple[ModelProto, bool]:
    """:func:`_read_proto`, plus whether any tensor in the file may reference external data.

    Every external reference carries the key ``location`` (protobuf stores strings as their
    raw bytes), so a file without those eight bytes has none, and the walk over every node's
    attributes that finds them (~2 us a node) can be skipped.
    """
    _check_model_file(path)
    shown = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"{shown}: cannot read the file: {_os_reason(err)}") from None
    if not data:
        raise InputError(f"{shown}: the file is empty, not an ONNX model")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise InputError(
            f"{shown}: not a valid ONNX model (protobuf parse failed: the file is truncated, corrupt or not ONNX)"
        ) from None
    maybe_external = b"location" in data
    del data
    if not model.HasField("graph"):
        raise InputError(f"{shown}: not an ONNX model (no graph in the file; truncated or not ONNX)")
    if model.ir_version <= 0:
        raise InputError(f"{shown}: not an ONNX model (missing ir_version; truncated or not ONNX)")
    if model.ir_version >= 3 and len(model.opset_import) == 0:
        raise InputError(f"{shown}: not a complete ONNX model (no opset_import; truncated?)")
    return model, maybe_external


def _external_info(tensor: TensorProto, model_shown: str) -> tuple[str, int, int | None]:
    location = ""
    offset = 0
    length: int | None = None
    for entry in tensor.external_data:
        if entry.key == "location":
            location = entry.value
        elif entry.key in ("offset", "length"):
            try:
                value = int(entry.value)
            except ValueError:
                raise InputError(
                    f"{model_shown}: tensor {_tensor_label(tensor)} has an invalid external data "
                    f"{entry.key} {entry.value!r}"
                ) from None
            if value < 0:
                raise InputError(
                    f"{model_shown}: tensor {_tensor_label(tensor)} has a negative external data {entry.key}"
                )
            if entry.key == "offset":
                offset = value
            else:
                length = value
    if not location:
        raise InputError(
            f"{model_shown}: tensor {_tensor_label(tensor)} is marked as external data but has no location"
        )
    return location, offset, length


def _safe_location(location: str, base_dir: Path, tensor: TensorProto, model_shown: str) -> Path:
    """The resolved path of an external data file, refused if it is not inside base_dir."""
    label = _tensor_label(tensor)
    if "\x00" in location:
        raise InputError(f"{model_shown}: tensor {label} has an invalid external data location")
    if (
        os.path.isabs(location)
        or location.startswith(("\\", "/"))
        or (len(location) > 1 and location[0].isalpha() and location[1] == ":")
    ):
        raise InputError(
            f"{model_shown}: refusing external data location {location!r} of tensor {label}: "
            "absolute paths are not allowed (external data must be inside the model's directory)"
        )
    base = base_dir.resolve()
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(
            f"{model_shown}: cannot resolve external data location {location!r} of tensor {label}: "
            f"{_os_reason(err)}"
        ) from None
    try:
        target.relative_to(base)
    except ValueError:
        raise InputError(
            f"{model_shown}: refusing external data location {location!r} of tensor {label}: "
            "it resolves outside the model's directory"
        ) from None
    if target == base:
        raise InputError(
            f"{model_shown}: refusing external data location {location!r} of tensor {label}: "
            "it names the model's directory itself"
        )
    return target


class _ExternalRef(NamedTuple):
    """One validated external-data reference: where a tensor's bytes are (``length`` None: to the end)."""

    tensor: TensorProto
    location: str
    target: Path
    offset: int
    length: int | None


def _external_refs(external: Iterable[TensorProto], base_dir: Path, model_shown: str) -> list[_ExternalRef]:
    """The reference of every external tensor, each location refused unless it is inside ``base_dir``."""
    refs = []
    for tensor in external:
        location, offset, length = _external_info(tensor, model_shown)
        target = _safe_location(location, base_dir, tensor, model_shown)
        refs.append(_ExternalRef(tensor, location, target, offset, length))
    return refs


def _data_file_size(ref: _ExternalRef, model_shown: str) -> int:
    """The size in bytes of ``ref``'s data file; InputError unless it is an existing regular file."""
    try:
        st = ref.target.stat()
    except FileNotFoundError:
        raise InputError(
            f"{model_shown}: external data file {ref.location!r} of tensor {_tensor_label(ref.tensor)} "
            "does not exist next to the model"
        ) from None
    except OSError as err:
        raise InputError(
            f"{model_shown}: cannot access external data file {ref.location!r} of tensor "
            f"{_tensor_label(ref.tensor)}: {_os_reason(err)}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{model_shown}: external data file {ref.location!r} of tensor {_tensor_label(ref.tensor)} "
            "is not a regular file"
        )
    return st.st_size


def _external_spans(refs: list[_ExternalRef], model_shown: str) -> list[tuple[_ExternalRef, int]]:
    """Each reference with its byte count, checked against its file's size and the tensor's type and shape."""
    sizes: dict[Path, int] = {}
    spans = []
    for ref in refs:
        tensor, location, target, offset, length = ref
        if target not in sizes:
            sizes[target] = _data_file_size(ref, model_shown)
        size = sizes[target]
        if offset > size or (length is not None and offset + length > size):
            end = "end of file" if length is None else f"{offset + length}"
            raise InputError(
                f"{model_shown}: external data of tensor {_tensor_label(tensor)} (offset {offset}, "
                f"up to {end}) lies beyond the end of {location!r} ({size} bytes)"
            )
        nbytes = size - offset if length is None else length
        expected = _expected_nbytes(tensor)
        if expected is not None and nbytes != expected:
            raise InputError(
                f"{model_shown}: external data of tensor {_tensor_label(tensor)} in {location!r} is "
                f"{nbytes} bytes but its type and shape need {expected} bytes"
            )
        spans.append((ref, nbytes))
    return spans


def _read_spans(spans: list[tuple[_ExternalRef, int]], model_shown: str) -> None:
    """Read each span's bytes into its tensor as raw data (dropping the reference); returns nothing."""
    handles: dict[Path, BinaryIO] = {}
    try:
        for ref, want in spans:
            tensor = ref.tensor
            f = handles.get(ref.target)
            if f is None:
                f = handles[ref.target] = open(ref.target, "rb")  # noqa: SIM115 - closed in finally
            f.seek(ref.offset)
            data = f.read(want)
            if len(data) != want:
                raise InputError(
                    f"{model_shown}: external data of tensor {_tensor_label(tensor)} in {ref.location!r} "
                    "ends early (the file changed while reading?)"
                )
            tensor.raw_data = data
            tensor.ClearField("data_location")
            del tensor.external_data[:]
    except OSError as err:
        raise InputError(f"{model_shown}: cannot read external data: {_os_reason(err)}") from None
    finally:
        for f in handles.values():
            f.close()


def _load_external(
    model: ModelProto,
    base_dir: Path,
    model_shown: str,
    external: list[TensorProto] | None = None,
    keep_above: int | None = None,
) -> None:
    """Validate every external reference, then read the data into the tensors (all of them, or with
    ``keep_above`` only those of at most that many bytes: larger initializers stay on disk)."""
    if external is None:
        external = [t for t in _all_tensors(model) if _is_external(t)]
    if not external:
        return
    # 1. Validate every reference before reading anything.
    spans = _external_spans(_external_refs(external, base_dir, model_shown), model_shown)
    # 2. Read.
    if keep_above is not None:
        stays = _initializer_ids(model)
        spans = [(ref, n) for ref, n in spans if not (id(ref.tensor) in stays and n > keep_above)]
    _read_spans(spans, model_shown)


def _initializer_ids(model: ModelProto) -> set[int]:
    return {id(t) for g in iter_graphs(model.graph) for t in g.initializer}


def load_model(
    path: PathLike, *, load_external_data: bool = True, keep_external_above: int | None = None
) -> ModelProto:
    """Load an ONNX model file read-only.

    External data referenced by the model is read (when ``load_external_data``) only
    from files inside the model's directory; with ``keep_external_above`` initializers larger
    than that many bytes stay on disk (validated, not read): save such a model with
    :func:`save_model`'s ``external_source``.  Locations are checked (absolute paths and
    paths resolving outside the directory are refused) even when the data is not
    loaded.  Every problem raises :class:`InputError` with a one-line message naming
    the file.  The file and its external data are never modified.
    """
    p = Path(os.fspath(path))
    model, maybe_external = _read_proto_flagged(p)
    # One walk (it costs ~2 us a node), and only when the file names a location at all.
    external = [t for t in _all_tensors(model) if _is_external(t)] if maybe_external else []
    _remember_locations(p, _locations_of(external))
    shown = str(p)
    base_dir = p.parent if str(p.parent) else Path(".")
    if load_external_data:
        _load_external(model, base_dir, shown, external, keep_external_above)
    else:
        _external_refs(external, base_dir, shown)
    return model


def load(model_or_path: ModelProto | PathLike) -> tuple[ModelProto, Path | None]:
    """Return ``(model, path)``: a ModelProto is returned as is (path None), a path is loaded."""
    if isinstance(model_or_path, ModelProto):
        return model_or_path, None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InputError(f"expected an ONNX ModelProto or a file path, got {type(model_or_path).__name__}")
    p = Path(os.fspath(model_or_path))
    return load_model(p), p


# External-data locations of model files parsed by load_model, keyed by the file's identity, so
# has_external_data / resolve_output_path need not parse a big model file a second time.
_LOCATIONS: dict[tuple[str, int, int], list[str]] = {}


def _file_key(p: Path) -> tuple[str, int, int] | None:
    try:
        st = p.stat()
        return (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _file_locations(p: Path) -> list[str]:
    """External-data locations the model file ``p`` names, parsed (and remembered) when not known:
    the walk over every tensor runs only when the file contains the word at all."""
    known = _known_locations(p)
    if known is None:
        model, maybe_external = _read_proto_flagged(p)
        known = _locations_of(t for t in _all_tensors(model) if _is_external(t)) if maybe_external else []
        _remember_locations(p, known)
    return known


def _locations_of(external: Iterable[TensorProto]) -> list[str]:
    found: dict[str, None] = {}
    for tensor in external:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                found[entry.value] = None
    return list(found)


def _remember_locations(p: Path, locations: list[str]) -> None:
    key = _file_key(p)
    if key is not None:
        if len(_LOCATIONS) > 64:
            _LOCATIONS.clear()
        _LOCATIONS[key] = locations


def _known_locations(p: Path) -> list[str] | None:
    key = _file_key(p)
    return None if key is None else _LOCATIONS.get(key)


def has_external_data(path_or_model: ModelProto | PathLike) -> bool:
    """Whether the model stores any tensor as external data.

    For a path, the file is parsed without loading the external data; for a
    ModelProto, the in-memory tensors are inspected (a model returned by
    :func:`load_model` has its external data loaded and therefore reports False).
    """
    if isinstance(path_or_model, ModelProto):
        model = path_or_model
    else:
        p = Path(os.fspath(path_or_model))
        known = _known_locations(p)
        if known is not None:
            return bool(known)
        model = _read_proto(p)
    return any(_is_external(t) for t in _all_tensors(model))


# --------------------------------------------------------------------------- structure


def _node_label(node: onnx.NodeProto, index: int) -> str:
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"node #{index} ({node.op_type})"


def _in_scopes(name: str, scopes: list[set[str]]) -> bool:
    """Whether ``name`` is defined in one of the (outer) ``scopes``."""
    return any(name in s for s in scopes)


def _graph_sources(graph: GraphProto, where: str) -> tuple[set[str], set[str]]:
    """The graph's input names and initializer names (dense and sparse); InputError on a duplicate."""
    input_names: set[str] = set()
    for vi in graph.input:
        if vi.name in input_names:
            raise InputError(f"duplicate graph input name {vi.name!r}{where}")
        input_names.add(vi.name)
    init_names: set[str] = set()
    for t in graph.initializer:
        if t.name in init_names:
            raise InputError(f"duplicate initializer name {t.name!r}{where}")
        init_names.add(t.name)
    for sp in graph.sparse_initializer:
        name = sp.values.name
        if name in init_names:
            raise InputError(f"duplicate initializer name {name!r}{where}")
        init_names.add(name)
    return input_names, init_names


def _producers(
    nodes: Sequence[onnx.NodeProto],
    input_names: set[str],
    init_names: set[str],
    scopes: list[set[str]],
    where: str,
) -> dict[str, int]:
    """The index of the node producing each tensor name; InputError on a name defined twice."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                other = producer[out]
                if other == i:
                    raise InputError(
                        f"duplicate tensor name: {_node_label(node, i)} lists output {out!r} twice{where}"
                    )
                raise InputError(
                    f"duplicate tensor name {out!r}: produced by {_node_label(nodes[other], other)} and "
                    f"{_node_label(node, i)}{where}"
                )
            if out in input_names or out in init_names:
                kind = "graph input" if out in input_names else "initializer"
                raise InputError(
                    f"duplicate tensor name {out!r}: output of {_node_label(node, i)} is also a {kind}{where}"
                )
            if _in_scopes(out, scopes):
                raise InputError(
                    f"duplicate tensor name {out!r}: output of {_node_label(node, i)} redefines a name "
                    f"from an outer graph{where}"
                )
            producer[out] = i
    return producer


def _subgraph_uses(
    node: onnx.NodeProto, index: int, inner_scopes: list[set[str]], where: str, depth: int
) -> list[str]:
    """Validate the node's subgraphs; the outer-scope names they use, subgraph by subgraph."""
    used: list[str] = []
    for attr in node.attribute:
        subs = list(_attr_graphs(attr))
        for k, sub in enumerate(subs):
            tag = attr.name if len(subs) == 1 else f"{attr.name}[{k}]"
            sub_where = f" in subgraph {tag!r} of {_node_label(node, index)}{where}"
            used.extend(_check_graph(sub, inner_scopes, sub_where, depth + 1))
    return used


def _node_uses(
    nodes: Sequence[onnx.NodeProto],
    producer: dict[str, int],
    defined: set[str],
    scopes: list[set[str]],
    where: str,
    depth: int,
) -> tuple[list[list[int]], set[str]]:
    """Each node's producers (explicit and implicit inputs via subgraphs) and the outer-scope names used."""
    free: set[str] = set()
    preds: list[list[int]] = [[] for _ in range(len(nodes))]
    inner_scopes = [*scopes, defined]
    for i, node in enumerate(nodes):
        used: list[str] = [name for name in node.input if name]
        used.extend(_subgraph_uses(node, i, inner_scopes, where, depth))
        seen: set[int] = set()
        for name in used:
            j = producer.get(name)
            if j is not None:
                if j not in seen:
                    seen.add(j)
                    preds[i].append(j)
            elif name in defined:
                continue
            elif _in_scopes(name, scopes):
                free.add(name)
            else:
                raise InputError(
                    f"{_node_label(node, i)} uses tensor {name!r} that no node, graph input or "
                    f"initializer defines{where}"
                )
    return preds, free


def _outer_outputs(
    graph: GraphProto, defined: set[str], scopes: list[set[str]], where: str, depth: int
) -> list[str]:
    """The graph outputs taken from an outer scope (subgraphs only); InputError if none or one is undefined."""
    if len(graph.output) == 0:
        raise InputError(f"the graph has no outputs{where}")
    outer: list[str] = []
    for vi in graph.output:
        if vi.name in defined:
            continue
        if depth > 0 and _in_scopes(vi.name, scopes):
            outer.append(vi.name)
            continue
        raise InputError(
            f"graph output {vi.name!r} is not produced by any node, graph input or initializer{where}"
        )
    return outer


def _check_graph(graph: GraphProto, scopes: list[set[str]], where: str, depth: int) -> set[str]:
    """Validate one graph; return the outer-scope names it (and its subgraphs) use."""
    if depth > _MAX_SUBGRAPH_DEPTH:
        raise InputError(f"subgraphs are nested more than {_MAX_SUBGRAPH_DEPTH} levels deep{where}")
    input_names, init_names = _graph_sources(graph, where)
    producer = _producers(graph.node, input_names, init_names, scopes, where)
    defined = input_names | init_names
    defined.update(producer)
    preds, free = _node_uses(graph.node, producer, defined, scopes, where, depth)
    free.update(_outer_outputs(graph, defined, scopes, where, depth))
    _check_acyclic(graph.node, preds, where)
    return free


def _check_acyclic(nodes: Sequence[onnx.NodeProto], preds: list[list[int]], where: str) -> None:
    """Kahn's algorithm; on a cycle, name the nodes of one cycle."""
    n = len(preds)
    indegree = [len(p) for p in preds]
    succs: list[list[int]] = [[] for _ in range(n)]
    for i, ps in enumerate(preds):
        for j in ps:
            succs[j].append(i)
    queue = deque(i for i in range(n) if indegree[i] == 0)
    done = 0
    while queue:
        j = queue.popleft()
        done += 1
        for i in succs[j]:
            indegree[i] -= 1
            if indegree[i] == 0:
                queue.append(i)
    if done == n:
        return
    # Every node left has a predecessor that is also left: walk back until a repeat.
    start = next(i for i in range(n) if indegree[i] > 0)
    order: list[int] = []
    pos: dict[int, int] = {}
    cur = start
    while cur not in pos:
        pos[cur] = len(order)
        order.append(cur)
        cur = next(j for j in preds[cur] if indegree[j] > 0)
    cycle = order[pos[cur] :][::-1]
    shown = [_node_label(nodes[i], i) for i in cycle[:6]]
    if len(cycle) > 6:
        shown.append("...")
    shown.append(_node_label(nodes[cycle[0]], cycle[0]))
    raise InputError(f"the graph contains a cycle: {' -> '.join(shown)}{where}")


def validate_structure(model: ModelProto) -> None:
    """Raise InputError unless the graph is a well-formed DAG.

    Checked, in the main graph and recursively in subgraphs (GRAPH/GRAPHS attributes,
    where outer-scope names are visible): unique tensor names (no two producers of a
    name, no node output that is also a graph input or initializer or an outer-scope
    name), every used tensor defined, at least one output, and no cycle.  Node order
    does not matter (only cycles are rejected).  Linear in the model size.
    """
    if not model.HasField("graph"):
        raise InputError("the model has no graph")
    _check_graph(model.graph, [], "", 0)


def checker_problem(model: ModelProto) -> str | None:
    """Run ``onnx.checker.check_model(full_check=True)``; the first line of the error, or None.

    The model is checked in one piece (:func:`whole_model_problem`); one too large to serialize
    in one protobuf (about 2 GB) is saved with external data to a temporary folder for it.
    """
    checked, problem = whole_model_problem(model, _AUTO_EXTERNAL_BYTES)
    if checked:
        return problem
    with tempfile.TemporaryDirectory(prefix="lnfuse-check-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            save_model(model, path, external_data=True)
        except InputError as err:
            return str(err)
        return checker_problem_at(path)


def whole_model_problem(model: ModelProto, limit: int) -> tuple[bool, str | None]:
    """``(True, checker_problem)`` of a model that serializes to fewer than ``limit`` bytes,
    ``(False, None)`` (not checked) otherwise.

    The check reads a temporary file (:func:`checker_problem_at`), the model's bytes freed
    before it runs; where no temporary file can be written it runs on the bytes in memory.
    """
    data = serialized_below(model, limit)
    if data is None:
        return False, None
    try:
        with tempfile.TemporaryDirectory(prefix="lnfuse-check-", ignore_cleanup_errors=True) as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(data)
            del data
            return True, checker_problem_at(path)
    except OSError:
        return True, _problem(model.SerializeToString())


def checker_problem_at(path: PathLike) -> str | None:
    """``checker_problem`` of the model file at ``path``.

    Given a ModelProto or its bytes, onnx's full check parses the model and then copies it
    whole before shape inference; given a path it does neither copy in Python and checks the
    model it parsed (110k-node chain, fused: 79 MiB over the import instead of 129 MiB).
    """
    return _problem(os.fspath(path))


def _problem(model: bytes | str) -> str | None:
    """The first line of what the full check of ``model`` (its bytes, or its path) raises, or None."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        for line in str(err).splitlines():
            if line.strip():
                return line.strip()
        return type(err).__name__
    return None


# --------------------------------------------------------------------------- output paths


def default_output_path(input_path: PathLike) -> Path:
    """``dir/model.onnx`` -> ``dir/model.ln.onnx``; without a ``.onnx`` suffix, append ``.ln.onnx``."""
    p = Path(os.fspath(input_path))
    if p.suffix.lower() == ".onnx":
        return p.with_name(p.name[: -len(p.suffix)] + ".ln.onnx")
    return p.with_name(p.name + ".ln.onnx")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def _input_data_files(inp: Path) -> list[Path]:
    """The external data files of the input model (best effort, small model files only)."""
    known = _known_locations(inp)
    if known is None:
        try:
            if not inp.is_file() or inp.stat().st_size > _SCAN_INPUT_BYTES:
                return []
            known = _file_locations(inp)
        except (InputError, OSError):
            return []
    return [inp.parent / loc for loc in known]


def _check_writable_dir(directory: Path, out: Path) -> None:
    shown = str(out)
    try:
        st = directory.stat()
    except FileNotFoundError:
        raise InputError(f"cannot write {shown}: the directory {str(directory)!r} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"cannot write {shown}: {str(directory)!r} is not a directory") from None
    except OSError as err:
        raise InputError(f"cannot write {shown}: {_os_reason(err)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"cannot write {shown}: {str(directory)!r} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {shown}: the directory {str(directory)!r} is not writable")
    # os.access is not the whole truth (root, read-only mounts, ACLs): try it.
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix="." + out.name + ".", suffix=".probe")
    except OSError as err:
        raise InputError(f"cannot write {shown}: {_os_reason(err)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def resolve_output_path(input_path: Path | None, output: PathLike | None, *, in_place: bool = False) -> Path:
    """Decide and check where the output model goes.

    ``output`` None means :func:`default_output_path` of the input (or the input itself
    with ``in_place``).  Writing onto the input (same file, also through a symlink or a
    hard link) is refused unless ``in_place``; so is writing the output or its
    ``<output>.data`` companion onto one of the input's external data files (checked
    for input model files up to 256 MB, which covers models that use external data).  The output directory must exist and be
    writable (checked with a real write attempt).
    """
    inp = Path(os.fspath(input_path)) if input_path is not None else None
    if output is None:
        if inp is None:
            raise InputError("no output path given (the input is not a file); pass an output path")
        out = inp if in_place else default_output_path(inp)
    else:
        out = Path(os.fspath(output))
    if not out.name or out.name in (".", ".."):
        raise InputError(f"output path {str(out)!r} does not name a file")
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise InputError(f"cannot write {out}: it is a directory")
    if inp is not None and not in_place:
        if _same_file(inp, out):
            raise InputError(f"refusing to overwrite the input {inp} with the output {out}; pass --in-place")
        companion = out.with_name(out.name + ".data")
        existing = [t for t in (out, companion) if t.exists()]  # only these could be overwritten
        for data_file in _input_data_files(inp) if existing else []:
            for target in existing:
                if _same_file(data_file, target):
                    raise InputError(
                        f"refusing to overwrite {target}: it is external data of the input {inp}; "
                        "choose another output path"
                    )
    _check_writable_dir(out.parent, out)
    return out


# --------------------------------------------------------------------------- saving


def _file_mode_for(path: Path) -> int:
    """Keep the mode of an existing file; else the mode a plain open() would give."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_and_sync(fd: int, blob: bytes) -> None:
    with os.fdopen(fd, "wb", closefd=True) as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the renames durable."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _tensor_bytes(tensor: TensorProto) -> bytes | None:
    """The little-endian raw bytes of a tensor, or None if it cannot become raw data."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if not any(len(getattr(tensor, field)) for field in _TYPED_FIELDS):
        return None
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def _serialize(model: ModelProto, out: Path) -> bytes:
    try:
        blob = model.SerializeToString()
    except (EncodeError, ValueError, RuntimeError, OverflowError) as err:
        raise InputError(
            f"cannot write {out}: the model cannot be serialized ({_one_line(err)}); "
            "save it with external data"
        ) from None
    if len(blob) > _PROTOBUF_LIMIT:
        raise InputError(f"cannot write {out}: the model exceeds 2 GB; save it with external data")
    return blob


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    """Wire encoding of one length-delimited field (a sub-message)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


_Encoder = Callable[[Message], bytes]


def _encode(msg: Message, special: dict[str, _Encoder]) -> bytes:
    """Serialize ``msg`` field by field (in field-number order, as protobuf does),
    encoding the sub-messages of the fields named in ``special`` with their function.

    ``msg`` itself is only read.  Unknown fields of ``msg`` are not kept.
    """
    parts: list[bytes] = []
    for fd, value in msg.ListFields():
        encode = special.get(fd.name)
        repeated = is_repeated(fd)
        if fd.message_type is not None:
            fn = encode or (lambda m: m.SerializeToString())
            for element in value if repeated else (value,):
                parts.append(_len_field(fd.number, fn(element)))
        else:  # scalars, strings, repeated scalars: let protobuf encode just this field
            single = type(msg)()
            if repeated:
                getattr(single, fd.name).extend(value)
            else:
                setattr(single, fd.name, value)
            parts.append(single.SerializeToString())
    return b"".join(parts)


class _ExternalWriter:
    """Serializes a model with its large initializers written to an open data file.

    Covered: dense initializers of the main graph and of every nested subgraph
    (GRAPH/GRAPHS attributes).  The model is never modified: tensors are copied one
    at a time into small stubs that carry the external-data reference.
    """

    _SKIP = frozenset(("raw_data", "external_data", "data_location", *_TYPED_FIELDS))

    def __init__(
        self, data_file: BinaryIO, data_name: str, size_threshold: int, source: Path | None = None
    ) -> None:
        self.data_file = data_file
        self.data_name = data_name
        self.size_threshold = size_threshold
        self.source = source  # where still-external tensors' references point (streamed from there)
        self.offset = 0

    def model(self, model: ModelProto) -> bytes:
        return _encode(model, {"graph": self.graph})  # type: ignore[dict-item]

    def graph(self, graph: GraphProto) -> bytes:
        return _encode(graph, {"initializer": self.tensor, "node": self.node})  # type: ignore[dict-item]

    def node(self, node: onnx.NodeProto) -> bytes:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return _encode(node, {"attribute": self.attribute})  # type: ignore[dict-item]
        return node.SerializeToString()

    def attribute(self, attr: AttributeProto) -> bytes:
        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            return _encode(attr, {"g": self.graph, "graphs": self.graph})  # type: ignore[dict-item]
        return attr.SerializeToString()

    def tensor(self, tensor: TensorProto) -> bytes:
        if _is_external(tensor) and self.source is not None:
            return self._stub(tensor, self._stream(tensor))
        raw = _tensor_bytes(tensor)
        if raw is None or len(raw) == 0 or len(raw) < self.size_threshold:
            return tensor.SerializeToString()
        self.data_file.write(raw)
        return self._stub(tensor, len(raw))

    def _stream(self, tensor: TensorProto) -> int:
        """Copy a still-external tensor's bytes from its source file in chunks; their count."""
        assert self.source is not None
        shown = str(self.source)
        location, offset, length = _external_info(tensor, shown)
        target = _safe_location(location, self.source, tensor, shown)
        with open(target, "rb") as f:
            f.seek(offset)
            left = (os.fstat(f.fileno()).st_size - offset) if length is None else length
            total = left
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise InputError(
                        f"external data of tensor {_tensor_label(tensor)} in {location!r} ends early"
                    )
                self.data_file.write(chunk)
                left -= len(chunk)
        return total

    def _stub(self, tensor: TensorProto, nbytes: int) -> bytes:
        stub = TensorProto()
        copy_fields(stub, tensor, self._SKIP)
        stub.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_name),
            ("offset", str(self.offset)),
            ("length", str(nbytes)),
        ):
            entry = stub.external_data.add()
            entry.key = key
            entry.value = value
        self.offset += nbytes
        return stub.SerializeToString()


def _write_external(
    model: ModelProto,
    out: Path,
    data_name: str,
    size_threshold: int,
    data_fd: int,
    source: Path | None = None,
) -> tuple[bytes, int]:
    """Write the selected initializers to ``data_fd`` (then fsync and close it) and
    return the serialized model pointing at ``data_name`` and the data size."""
    with os.fdopen(data_fd, "wb", closefd=True) as f:
        writer = _ExternalWriter(f, data_name, size_threshold, source)
        blob = writer.model(model)
        f.flush()
        os.fsync(f.fileno())
    if len(blob) > _PROTOBUF_LIMIT:
        raise InputError(f"cannot write {out}: the model exceeds 2 GB even with its initializers external")
    return blob, writer.offset


def _remove(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
    paths.clear()


def _streams_external(model: ModelProto, out: Path, source: Path | None) -> bool:
    """Whether some tensor still references external data to copy from ``source``; InputError if one cannot be saved."""
    streams = False
    for tensor in _all_tensors(model):
        if not _is_external(tensor):
            continue
        has_location = any(e.key == "location" and e.value for e in tensor.external_data)
        if source is not None and has_location:
            streams = True
            continue
        if not has_location:
            raise InputError(
                f"cannot write {out}: tensor {_tensor_label(tensor)} is marked as external data "
                "but has no location"
            )
        raise InputError(
            f"cannot write {out}: tensor {_tensor_label(tensor)} still references external data "
            "that was not loaded; load the model with its external data first"
        )
    return streams


def _save_plan(
    model: ModelProto, out: Path, external_data: bool | None, source: Path | None
) -> tuple[bool, bytes | None]:
    """Whether to write external data, and the model's bytes when the automatic size check made them."""
    if _streams_external(model, out, source):
        return True, None
    if external_data is None:
        blob = serialized_below(model, _AUTO_EXTERNAL_BYTES + 1)
        return blob is None, blob
    return external_data, None


def _new_temp(directory: Path, name: str, temps: list[str]) -> tuple[int, str]:
    """A new temporary file for ``name`` in ``directory``, recorded in ``temps``: its fd and path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + name + ".", suffix=".tmp")
    temps.append(tmp)
    return fd, tmp


def _write_data_temp(
    model: ModelProto, out: Path, size_threshold: int, source: Path | None, temps: list[str]
) -> tuple[bytes, str | None]:
    """The model's bytes and the temporary data file written for them (None, and removed, if empty)."""
    data_name = out.name + ".data"
    fd, data_tmp = _new_temp(out.parent, data_name, temps)
    blob, written = _write_external(model, out, data_name, size_threshold, fd, source)
    if written == 0:
        _remove([data_tmp])
        temps.remove(data_tmp)
        return blob, None
    os.chmod(data_tmp, _file_mode_for(out.parent / data_name))
    return blob, data_tmp


def _rename_into_place(tmp: str, data_tmp: str | None, out: Path, temps: list[str]) -> None:
    """Rename the data file, then the model file onto their final names; returns nothing."""
    if data_tmp is not None:
        data_path = out.parent / (out.name + ".data")
        os.replace(data_tmp, data_path)
        temps.remove(data_tmp)
        # If the model rename below fails, the data file placed here is removed too.
        temps.append(str(data_path))
    os.replace(tmp, out)
    temps.clear()
    _fsync_dir(out.parent)


def _write_files(
    model: ModelProto,
    out: Path,
    external_data: bool | None,
    size_threshold: int,
    source: Path | None,
    temps: list[str],
) -> None:
    """Write the model (and its data file) through temporaries listed in ``temps``; returns nothing.
    The model's bytes live only here, and go before the renames."""
    external, blob = _save_plan(model, out, external_data, source)
    mode = _file_mode_for(out)
    data_tmp = None
    if external:
        blob, data_tmp = _write_data_temp(model, out, size_threshold, source, temps)
    elif blob is None:
        blob = _serialize(model, out)
    fd, tmp = _new_temp(out.parent, out.name, temps)
    _write_and_sync(fd, blob)
    del blob
    os.chmod(tmp, mode)
    _rename_into_place(tmp, data_tmp, out, temps)


def save_model(
    model: ModelProto,
    path: PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    external_source: PathLike | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the (absolute) path.

    The bytes go to a temporary file in the target directory, are fsynced and then
    renamed onto ``path``; on any error the temporary files are removed and
    :class:`InputError` names the output and the OS error.  Nothing on the model is
    changed (the caller sets ir_version and opsets).

    ``external_data``: None = automatic (external when the model would exceed about
    1.9 GB), True = always, False = never.  When external, every dense initializer of
    the main graph and of all nested subgraphs (If/Loop/Scan bodies) whose data is at
    least ``size_threshold`` bytes (and not empty) goes into one file
    ``<output filename>.data`` next to the output, byte for byte (tensors stored in
    typed fields such as ``float_data`` are converted to little-endian raw bytes).
    Attribute tensors (Constant values), sparse initializers, string tensors and
    everything inside local functions stay inline.  The data file is written to a
    temporary name as well and renamed before the model file (if the model rename
    then fails, the data file is removed again); it is not written at all when no
    tensor qualifies.  ``model`` is only read: the model file is encoded field by
    field with small stubs in place of the externalized tensors, so besides the model
    itself only one tensor's bytes are held at a time.  (Unknown protobuf fields of
    the model, graphs, nodes and attributes on that path are not kept.)  A model that
    still references external data (loaded without its data) can be saved only with
    ``external_source``, the directory those references are relative to: each such initializer is
    copied from there into the output's data file in chunks, byte for byte (never read whole);
    otherwise InputError.
    """
    out = Path(os.path.abspath(os.fspath(path)))
    source = Path(os.fspath(external_source)) if external_source is not None else None
    temps: list[str] = []
    try:
        _write_files(model, out, external_data, size_threshold, source, temps)
    except InputError:
        _remove(temps)
        raise
    except OSError as err:
        _remove(temps)
        raise InputError(f"cannot write {out}: {_os_reason(err)}") from None
    except BaseException:
        _remove(temps)
        raise
    return out


# --------------------------------------------------------------------------- misc


def file_digest(path: PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()
