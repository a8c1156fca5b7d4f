"""Inline model-local functions: the part of ``onnx.inliner.inline_local_functions`` the fixtures use.

``onnx.inliner`` is new in onnx 1.15; lnfuse supports onnx 1.14, so the fixture builders and
tests use this instead. It covers calls in the main graph to model-local functions without
attribute references, as the schema's context-dependent function bodies are once their
attributes are bound, and names things the way ``onnx.inliner`` does (the k-th call's internal
values get the suffix ``__k``, formal parameters become the call's actual names, an unbound
optional output keeps its internal name), so the result is byte for byte what ``onnx.inliner``
gives (checked by ``tests/test_inline.py`` where onnx has it).
"""

from __future__ import annotations

import onnx

__all__ = ["inline_local_functions"]


def _call(fn: onnx.FunctionProto, call: onnx.NodeProto, suffix: str) -> list[onnx.NodeProto]:
    """The nodes of ``fn`` for one ``call``, renamed."""
    if any(a.ref_attr_name for n in fn.node for a in n.attribute):
        raise NotImplementedError(f"function {fn.name!r} references attributes; use onnx.inliner")
    names = {f: a for f, a in zip(fn.input, call.input, strict=False)}
    names.update({f: a for f, a in zip(fn.output, call.output, strict=False) if a})
    names[""] = ""
    out = []
    for node in fn.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[:] = [names.get(i, i + suffix) for i in node.input]
        new.output[:] = [names.get(o, o + suffix) for o in node.output]
        out.append(new)
    return out


def inline_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every main-graph call of a model-local function replaced by its body."""
    functions = {(f.domain, f.name): f for f in model.functions}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        fn = functions.get((node.domain, node.op_type))
        if fn is None:
            nodes.append(node)
            continue
        count += 1
        nodes.extend(_call(fn, node, f"__{count}"))
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    del result.functions[:]
    return result
