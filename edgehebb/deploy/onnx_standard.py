"""The standard-ops form of an edgehebb ONNX export, which any ONNX client can run.

The default export keeps each NNL block as one ``ai.edgehebb::PatchNormPowReLU`` node with a
model-local function as its definition (``export/OP_SPEC.md``). ONNX Runtime and TensorRT's parser
expand that function; OpenCV DNN and many other clients ignore local functions and stop at the
custom node. :func:`standard_ops` derives, from that same model, one with no custom node and no
function:

1. ``onnx.inliner.inline_local_functions`` puts the function's body in place of each node, so the
   two files share one definition of the op and cannot drift apart; the body's values and nodes are
   then named after the node they replace (``block0/cos``, not the inliner's ``cos__1``), which is
   what Netron shows and what TensorRT names its layers after;
2. every node whose inputs are all constant (the filter preprocessing, the one-hot patch kernels,
   the shape arithmetic and the ``Constant`` nodes that carry the op's attributes) is evaluated once
   by onnx's reference evaluator and becomes an initializer. What is left is the per-image work.
   This also removes what OpenCV 5.0 refused in the inlined graph: it reads a ``value_int``
   ``Constant`` as int32, and then the ``Mul`` of the int64 pad pattern by the padding mixes integer
   types (both its engines). The only integers left are int64 initializers and ``Shape`` outputs;
3. exact no-ops are dropped: ``Pad`` by zeros, ``Mul`` by 1, ``Add``/``Sub`` of 0 (a ``padding`` of
   0 or a ``center`` of 1 leave such nodes behind); the results are bit for bit the same;
4. ONNX shape inference (strict, with data propagation) writes every activation's shape into
   ``graph.value_info``, starting from the shapes the exporter declared. With a fixed input size
   every dimension but the batch is static.

:func:`activation_shapes` gives the default export the same shapes for its own graph, which shape
inference cannot derive through the custom node (its pads are computed from an attribute).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.inliner import inline_local_functions

STANDARD_DOMAINS = ("", "ai.onnx")


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has a node outside the standard ONNX domain or a model-local function."""
    return bool(model.functions) or any(n.domain not in STANDARD_DOMAINS for n in model.graph.node)


def standard_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its local functions inlined, constants folded and shapes inferred (module doc)."""
    calls = [(n.name or n.output[0], n.output[0]) for n in model.graph.node if n.domain not in STANDARD_DOMAINS]
    model = inline_local_functions(model)
    _name_after_callers(model.graph, calls)
    del model.functions[:]
    standard = [o for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(standard)
    opsets = {"": next(o.version for o in standard)}
    constants = _fold_constants(model.graph, opsets)
    _drop_no_ops(model.graph, constants)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    produced = {o for n in model.graph.node for o in n.output}
    declared = [v for v in model.graph.value_info if v.name in produced]   # the exporter's, for what is left
    del model.graph.value_info[:]
    model.graph.value_info.extend(declared)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def activation_shapes(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Shapes of ``model``'s own activations (main graph, not function bodies), inferred on its standard-ops form."""
    produced = {o for n in model.graph.node for o in n.output} - {o.name for o in model.graph.output}
    produced -= {v.name for v in model.graph.value_info}   # declared already
    return [v for v in standard_ops(model).graph.value_info if v.name in produced]


def _name_after_callers(graph: onnx.GraphProto, calls: list[tuple[str, str]]) -> None:
    """Rename the inlined values of the k-th call, ``<value>__<k>``, to ``<caller>/<value>`` and name
    every unnamed node after its first output. A call's k is read off the node that now produces the
    caller's output: its inputs come from the same call."""
    producer = {o: n for n in graph.node for o in n.output}
    callers = {}
    for caller, output in calls:
        node = producer.get(output)
        ks = {m[1] for i in (node.input if node else []) if (m := re.fullmatch(r".*__(\d+)", i))}
        if len(ks) == 1:
            callers[ks.pop()] = caller

    def renamed(name: str) -> str:
        m = re.fullmatch(r"(.*)__(\d+)", name)
        return f"{callers[m[2]]}/{m[1]}" if m and m[2] in callers else name

    for node in graph.node:
        node.input[:] = [renamed(i) for i in node.input]
        node.output[:] = [renamed(o) for o in node.output]
        node.name = node.name or node.output[0]
    for value in graph.value_info:
        value.name = renamed(value.name)


def _fold_constants(graph: onnx.GraphProto, opsets: dict[str, int]) -> dict[str, np.ndarray]:
    """Evaluate the nodes whose inputs are all constant; returns every constant (initializers too)."""
    from onnx.reference import ReferenceEvaluator

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:   # nodes are in topological order
        inputs = [i for i in node.input if i]
        foldable = all(i in constants for i in inputs) and (inputs or node.op_type == "Constant")
        if not foldable or node.domain not in STANDARD_DOMAINS:
            kept.append(node)
            continue
        outputs = ReferenceEvaluator(node, opsets=opsets).run(None, {i: constants[i] for i in inputs})
        constants.update((name, np.asarray(v)) for name, v in zip(node.output, outputs))
    del graph.node[:]
    graph.node.extend(kept)
    return constants


def _is_no_op(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` returns its first input unchanged (same values, shape and type)."""

    def scalar(name: str, value: float) -> bool:   # one element: broadcasting cannot change the shape
        c = constants.get(name)
        return c is not None and c.size == 1 and c.ndim <= 1 and bool(c.reshape(()) == value)

    if len(node.input) < 2 or node.input[0] in constants:
        return False
    if node.op_type == "Pad":
        pads = constants.get(node.input[1])
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        return pads is not None and mode == b"constant" and not pads.any()
    if node.op_type == "Mul":
        return scalar(node.input[1], 1.0)
    if node.op_type in ("Add", "Sub"):
        return scalar(node.input[1], 0.0)
    return False


def _drop_no_ops(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> None:
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
        if _is_no_op(node, constants) and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
