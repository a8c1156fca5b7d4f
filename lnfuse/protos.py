"""Helpers over ONNX protos: walking every graph and node (bodies of Loop / Scan / If included),
sizes that never serialize (or copy) a multi-GB model, and shape inference guarded for size."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import helper

# Shape inference serializes the model; beyond this size it is skipped (protobuf's 2 GB limit).
INFER_LIMIT = 1_800_000_000


def is_repeated(fd: object) -> bool:
    """Whether a protobuf field descriptor is repeated (``label`` is gone in protobuf 7)."""
    flag = getattr(fd, "is_repeated", None)
    if isinstance(flag, bool):
        return flag
    return getattr(fd, "label", 0) == 3  # LABEL_REPEATED


def copy_fields(
    dst: Message, src: Message, skip: frozenset[str] | set[str] = frozenset(), *, clear: bool = False
) -> None:
    """Give ``dst`` every field ``src`` has, except those named in ``skip``.

    ``clear``: first clear every field of ``dst`` not in ``skip`` (so ``dst`` ends up equal to
    ``src`` on those fields). Sub-messages and repeated fields are copied.
    """
    if clear:
        for fd in dst.DESCRIPTOR.fields:
            if fd.name not in skip:
                dst.ClearField(fd.name)
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop / Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, each once (iterative: no recursion limit)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            stack.extend(node_subgraphs(node))


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the graphs nested in it."""
    for g in iter_graphs(graph):
        yield from g.node


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Data size of a tensor from its dims and type, without touching (or copying) its data."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return t.ByteSize()
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * itemsize


def model_nbytes(model: onnx.ModelProto) -> int:
    """Serialized size; summed per initializer for big models (sizing a > 2 GB message fails or copies it)."""
    inits = sum(tensor_nbytes(t) for t in model.graph.initializer)
    if inits > 1_000_000_000:
        return inits
    try:
        return model.ByteSize()
    except Exception:
        return 1 << 62


def serialized_below(model: onnx.ModelProto, limit: int) -> bytes | None:
    """``model.SerializeToString()`` when it is smaller than ``limit`` bytes, else None.

    One serialization gives both the size and bytes the checker or a file write can use
    (``ByteSize`` walks the whole message as well). A model with more than 256 MB of weights is
    sized first, so one over the limit is never serialized for nothing.
    """
    weights = sum(tensor_nbytes(t) for t in model.graph.initializer)
    if weights >= limit or (weights > 256 << 20 and model_nbytes(model) >= limit):
        return None
    try:
        data = model.SerializeToString()
    except Exception:
        return None
    return data if len(data) < limit else None


def inferred_or_same(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after ONNX shape inference, or ``model`` itself when too big or inference fails."""
    if model_nbytes(model) >= INFER_LIMIT:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return model
