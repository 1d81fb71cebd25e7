"""TensorRT decisions as data, tested without TensorRT: what :mod:`edgehebb.deploy.tensorrt_engine` builds and checks.

Which build a TensorRT version gets (``engine_plan``), the optimisation profile read from the ONNX
input (``profile_shapes``), the ``ai.edgehebb`` nodes whose layers must stay FP32 (``custom_nodes``,
``is_custom_layer``: see tensorrt_engine's module doc for how the parser names them), the class names
an ONNX file carries, the sidecar that describes an engine, and the batch checks of a runner.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edgehebb.deploy import op
from edgehebb.errors import EdgehebbError

SIDECAR_FORMAT = "edgehebb.trt-engine/1"
# The two input conventions of an exported model: (ONNX elem_type, dtype name, layout).
INPUT_KINDS = {"images": (1, "float32", "NCHW"), "frames": (2, "uint8", "NHWC")}   # 1 FLOAT, 2 UINT8

# Why the op stays FP32: cos^n with n = 40 drops below FP16's smallest normal (6.1e-5) once cos < 0.785.
FP16_UNDERFLOW = "cos^40 falls below FP16's smallest normal (6.1e-5) for cos < 0.785"


def parse_version(version: str) -> tuple[int, int, int, int]:
    """``"10.7.0.23"`` -> ``(10, 7, 0, 23)``; missing parts are 0, suffixes (``.post1``, ``b1``) ignored."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not m:
        raise EdgehebbError(f"cannot read a TensorRT version from {version!r}")
    return tuple(int(g) if g else 0 for g in m.groups())  # type: ignore[return-value]


def engine_plan(trt_version: str, fp16: bool) -> dict:
    """What a build with TensorRT ``trt_version`` does; raises EdgehebbError for what it cannot do.

    Keys: ``network_flags`` (names of NetworkDefinitionCreationFlag members to set), ``strongly_typed``,
    ``builder_fp16`` (set BuilderFlag.FP16), ``obey_precision_constraints``, ``fp32_custom_layers`` (pin
    the op's layers, what feeds them and everything after them to FP32), ``disable_tf32``, ``plugin_replaces_function``,
    ``plugin_override_flag``, ``precision`` and ``notes`` (lines worth logging).
    """
    major, minor, *_ = parse_version(trt_version)
    if major < 10:
        raise EdgehebbError(f"TensorRT {trt_version} is too old: edgehebb needs TensorRT 10 or newer "
                            "(name-based tensors, execute_async_v3); install it with: pip install 'edgehebb[gpu]'")
    notes: list[str] = []
    if fp16 and major >= 11:
        # TensorRT 11 removed BuilderFlag.FP16 and the precision constraints ("Removed Python APIs and
        # Replacements", docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
        # tensorrt-10x-to-11x-python-api-reference.html): reduced precision must be in the graph.
        raise EdgehebbError(
            f"--fp16 is not available with TensorRT {trt_version}: TensorRT 11 builds strongly typed networks "
            "only, so FP16 must be in the ONNX graph as Cast nodes (e.g. NVIDIA ModelOpt AutoCast), which "
            f"edgehebb does not export yet, and the ai.edgehebb op must stay FP32 ({FP16_UNDERFLOW}); "
            "build without --fp16, or with TensorRT 10.x")
    weak_fp16 = fp16 and major == 10
    if weak_fp16:
        notes.append("fp16: the ai.edgehebb op, every layer feeding it and every layer after it stay FP32 ("
                     + FP16_UNDERFLOW + "); only layers beside it may run in FP16 - check accuracy with edgehebb eval")
        if minor >= 12:
            # 10.12 release notes: "Weak typing APIs deprecated ... TensorRT will be using strong-typing
            # exclusively in the future."
            notes.append(f"TensorRT {major}.{minor} deprecates weak typing (BuilderFlag.FP16); TensorRT 11 removes it")
    return {
        "tensorrt": str(trt_version),
        "precision": "fp16" if fp16 else "fp32",
        # STRONGLY_TYPED exists in every 10.x (the 10.0 Python API lists it beside the ignored
        # EXPLICIT_BATCH; docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/
        # Builder.html). An FP32 build uses it so the ONNX types are exactly what runs, the same as on
        # TensorRT 11, where every network is strongly typed and the flag is deprecated and ignored
        # (11.0.0/_static/python-api/infer/Core/Builder.html), so we pass none there.
        "network_flags": ["STRONGLY_TYPED"] if major == 10 and not fp16 else [],
        "strongly_typed": not weak_fp16,
        "builder_fp16": weak_fp16,
        "obey_precision_constraints": weak_fp16,
        "fp32_custom_layers": weak_fp16,
        # TF32 rounds conv/matmul inputs to a 10-bit mantissa; the cosine then goes through a 40th power,
        # which multiplies its relative error by 40. Keep FP32 math an FP32 build.
        "disable_tf32": True,
        "plugin_replaces_function": (major, minor) >= (10, 7),
        "plugin_override_flag": (major, minor) >= (10, 15),
        "notes": notes,
    }


@dataclass(frozen=True)
class OnnxInput:
    name: str                          # "images" or "frames"
    dtype: str                         # "float32" or "uint8"
    layout: str                        # "NCHW" or "NHWC"
    shape: tuple[int | None, ...]      # None where the ONNX dimension is symbolic or unset


def onnx_input(model) -> OnnxInput:
    """The model's one image input, checked against edgehebb's two conventions."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    expect = "one input named 'images' (float32 [N,3,H,W]) or 'frames' (uint8 [N,H,W,3])"
    if len(inputs) != 1 or inputs[0].name not in INPUT_KINDS:
        raise EdgehebbError(f"the ONNX model must have {expect}; it has {[i.name for i in inputs]}")
    value = inputs[0]
    elem_type, dtype, layout = INPUT_KINDS[value.name]
    tensor = value.type.tensor_type
    if tensor.elem_type != elem_type:
        raise EdgehebbError(f"ONNX input {value.name!r} must be {dtype} (ONNX elem_type {elem_type}), "
                            f"not elem_type {tensor.elem_type}")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
    if len(shape) != 4:
        raise EdgehebbError(f"ONNX input {value.name!r} must have 4 dimensions ({layout}), has {len(shape)}")
    return OnnxInput(value.name, dtype, layout, shape)


def profile_shapes(inp: OnnxInput, batch: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Min/opt/max shapes of the optimisation profile: ``batch`` = (min, opt, max) over the batch dim.

    A batch fixed in the ONNX file wins over ``batch``; every other dimension must be fixed.
    """
    batch = tuple(int(b) for b in batch)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise EdgehebbError(f"batch must be three sizes min <= opt <= max, all >= 1; got {batch}")
    rest = inp.shape[1:]
    if any(d is None for d in rest):
        dims = "x".join("?" if d is None else str(d) for d in inp.shape)
        if inp.name == "frames":
            raise EdgehebbError(f"ONNX input 'frames' has a dynamic frame size ({dims}, NHWC); a TensorRT engine "
                                "with baked-in preprocessing needs a fixed H and W: export again with "
                                "--frame-size HxW (or export the float 'images' input)")
        raise EdgehebbError(f"ONNX input {inp.name!r} ({dims}) may only be dynamic in the batch dimension")
    if inp.shape[0] is not None:
        batch = (inp.shape[0],) * 3
    return {k: (b, *rest) for k, b in zip(("min", "opt", "max"), batch)}  # type: ignore[misc]


def custom_nodes(model, domain: str = op.DOMAIN) -> list[tuple[str, str]]:
    """(node name, op type) of every top-level graph node in ``domain``, in graph order."""
    return [(n.name, n.op_type) for n in model.graph.node if n.domain == domain]


def is_custom_layer(layer_name: str, metadata: str, nodes: Sequence[tuple[str, str]]) -> bool:
    """Whether a TensorRT layer came from one of ``nodes`` (see the module docstring for the naming)."""
    for node_name, op_type in nodes:
        # A plugin layer is named after the node; the parser's unique names add "_<n>".
        if node_name and (layer_name == node_name or layer_name.startswith(node_name + "_")):
            return True
        # Inlined function body: "[ONNX Layer: Pow_3 | nnl_block0 (PatchNormPower)]" (10.6+) or
        # "[ONNX Layer: Pow_3 | Local Function: PatchNormPower]" (before 10.6).
        if f" ({op_type})" in metadata or f"Local Function: {op_type}" in metadata:
            return True
    return False


def onnx_classes(model) -> list[str] | None:
    """Class names from the ONNX metadata ``edgehebb.classes`` (a JSON list), or None."""
    for prop in model.metadata_props:
        if prop.key == op.META_CLASSES:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                value = [c.strip() for c in prop.value.split(",")]
            if isinstance(value, list) and all(isinstance(c, str) for c in value):
                return value
            raise EdgehebbError(f"ONNX metadata {op.META_CLASSES!r} must be a JSON list of names, got {prop.value[:80]!r}")
    return None


def sidecar_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``: what was built, from what, and how."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def check_batch(shape: Sequence[int], sample_shape: Sequence[int], min_batch: int, max_batch: int, what: str) -> int:
    """The batch size of an input of ``shape``; EdgehebbError if it does not fit the engine's profile."""
    shape, sample_shape = tuple(shape), tuple(sample_shape)
    if shape[1:] != sample_shape:
        raise EdgehebbError(f"{what} must have shape (N, {', '.join(map(str, sample_shape))}), got {shape}")
    n = shape[0]
    if not min_batch <= n <= max_batch:
        raise EdgehebbError(f"batch of {n} is outside the engine's profile ({min_batch}..{max_batch}); "
                            f"split it, or rebuild the engine with a larger --batch")
    return n


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(engine_path: Path) -> dict:
    try:
        return json.loads(sidecar_path(engine_path).read_text())
    except (OSError, ValueError):
        return {}
