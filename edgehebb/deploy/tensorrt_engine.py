"""TensorRT engines for edgehebb's ONNX models: build one (``build_engine``) and run it (``TrtRunner``).

This is the thin part that calls TensorRT, imported only inside it; every decision it takes is plain
Python in :mod:`edgehebb.deploy.tensorrt_plan`, tested without TensorRT.

How TensorRT runs the custom op. The exporter writes the patch-norm/power op as a node in domain
``ai.edgehebb`` *and* a model-local ONNX function holding its standard-op body. The TensorRT ONNX
parser imports local functions since TensorRT 9.0 (onnx-tensorrt docs/Changelog.md, "9.0 GA: Improved
support for importing ONNX Local Functions"), so with no plugin loaded the body runs: that is the default
path, and edgehebb ships no plugin. From 10.7 the parser "prioritizes using plugins over local functions
when a corresponding plugin is available in the registry" (same changelog, 10.7 GA; before that a plugin
could not replace a function, NVIDIA/TensorRT issue #4113), and 10.15 adds the parser flag
``kENABLE_PLUGIN_OVERRIDE`` (10.15 GA). ``engine_plan`` records which applies.

Where the op's layers are. The parser names each layer after the ONNX node it came from
(``ImporterContext::registerLayer`` in onnx-tensorrt): for an inlined function those are the *body*
nodes (``node_of_<output>`` for the exporter's unnamed body nodes, ``getNodeName``), and the calling node
(``block0``, ...) appears only in the layer's metadata, as
``[ONNX Layer: <body node> | <caller> (<function>)]`` from 10.6 on and ``| Local Function: <function>``
before (``processMetadata`` in onnx-tensorrt's importerUtils.cpp; changelog 10.6: "Updated local function
metadata"). A plugin layer, when one replaces the function, carries the caller's name. ``is_custom_layer``
matches all three.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from edgehebb.deploy import op
from edgehebb.deploy.op import load_onnx
from edgehebb.deploy.tensorrt_plan import (FP16_UNDERFLOW, SIDECAR_FORMAT, check_batch, custom_nodes,
                                           engine_plan, file_sha256, is_custom_layer, onnx_classes, onnx_input,
                                           profile_shapes, read_sidecar, sidecar_path)
from edgehebb.errors import EdgehebbError, require
from edgehebb.io import atomic_write, atomic_write_json


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _import_tensorrt(why: str):
    # a stub wheel without libnvinfer fails inside tensorrt's own import: require() says so
    return require("tensorrt", extra="gpu", why=why)


def preflight(fp16: bool) -> dict:
    """Import TensorRT and check that it can build what is asked: the CLI calls this before it writes
    the ONNX file, so a missing TensorRT or an impossible ``--fp16`` costs nothing. Returns the plan."""
    trt = _import_tensorrt("needed to build TensorRT engines")
    return engine_plan(trt.__version__, fp16)


def _set_timing_cache(config, path: Path | None, log: Callable[[str], None]) -> None:
    # IBuilderConfig.create_timing_cache / set_timing_cache(cache, ignore_mismatch) and
    # ITimingCache.serialize: docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/
    # TimingCache.html; the same load/save pattern as TensorRT's samples/python/common_runtime.py.
    try:
        data = path.read_bytes() if path is not None and path.is_file() else b""
    except OSError as e:
        raise EdgehebbError(f"cannot read the timing cache {path}: {e.strerror or e}") from None
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another TensorRT version or GPU is refused; a fresh one only costs build time.
        log(f"timing cache {path} does not fit this TensorRT/GPU; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _keep_outputs(network, keep: Sequence[str]) -> None:
    """Unmark every network output not in ``keep`` (DeepStream's classifier parses every output it sees)."""
    tensors = [network.get_output(i) for i in range(network.num_outputs)]
    missing = set(keep) - {t.name for t in tensors}
    if missing:
        raise EdgehebbError(f"no output named {sorted(missing)} in the network; it has {[t.name for t in tensors]}")
    for tensor in tensors:
        if tensor.name not in keep:
            network.unmark_output(tensor)   # as Polygraphy's backend/trt/util.py unmark_outputs does


def _inputs(layer) -> list:
    return [t for t in (layer.get_input(k) for k in range(layer.num_inputs)) if t is not None]


def _outputs(layer) -> list:
    return [layer.get_output(k) for k in range(layer.num_outputs)]


def _pin_fp32(trt, network, nodes: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Pin the custom op's layers, every layer feeding them and every layer after them to FP32.

    Returns (pinned layer names, float layers left free to run in FP16). Layer-level precision in a
    weakly typed network: ``layer.precision`` and ``layer.set_output_type``, enforced by
    BuilderFlag.OBEY_PRECISION_CONSTRAINTS (TensorRT 10 "Precision Control", reduced precision in
    weakly-typed networks: docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/
    precision-control.html). Pinning only the op would not do: its tiny outputs would underflow in the
    first FP16 layer after it; its filters rounded to FP16 would move the cosine by ~1e-3, which the
    40th power makes ~4%; and frame preprocessing in FP16 rounds the op's input enough to move
    fig2_left's logits by 1.7e-2 of a row's largest (1,000 CIFAR-10 test images; OP_SPEC allows 1e-4).
    The parser adds layers in graph order, so producers come before consumers.
    """
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    op = [layer for layer in layers if is_custom_layer(layer.name, getattr(layer, "metadata", "") or "", nodes)]
    if not op:   # FP32 spreads from the op's own layers: without them the op could run in FP16
        raise EdgehebbError(f"found no TensorRT layers of the ai.edgehebb nodes {[n for n, _ in nodes]}; refusing "
                            f"an FP16 build that could run the op in FP16 ({FP16_UNDERFLOW})")
    chosen = list(op)
    # what feeds the op, back to the network input (and the constants the op reads)
    needed = {t.name for layer in op for t in _inputs(layer)}
    for layer in reversed(layers):
        if layer not in chosen and any(t.name in needed for t in _outputs(layer)):
            chosen.append(layer)
            needed.update(t.name for t in _inputs(layer))
    # what follows it
    fp32_tensors = {t.name for layer in op for t in _outputs(layer)}
    for layer in layers:
        if layer not in chosen and any(t.name in fp32_tensors for t in _inputs(layer)):
            chosen.append(layer)
            fp32_tensors.update(t.name for t in _outputs(layer))
    read = {t.name for layer in chosen for t in _inputs(layer)}   # constants of the layers after it too
    chosen += [layer for layer in layers if layer.num_inputs == 0 and layer not in chosen
               and any(t.name in read for t in _outputs(layer))]
    pinned, free = [], []
    for layer in layers:
        outputs = _outputs(layer)
        if not outputs or any(t.dtype != trt.float32 for t in outputs):
            continue   # shape and index layers keep their integer types
        if layer not in chosen:
            if layer.num_inputs:   # a constant counts with the layer that reads it
                free.append(layer.name)
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    return pinned, free


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = False,
                 batch: Sequence[int] = (1, 32, 256), workspace_mib: int = 1024,
                 timing_cache: str | Path | None = None, outputs: Sequence[str] | None = None,
                 log: Callable[[str], None] = _stderr) -> Path:
    """Build a TensorRT engine from an edgehebb ONNX file; writes ``engine_path`` and ``<engine>.json``.

    ``batch`` is the (min, opt, max) batch of the optimisation profile; ``timing_cache`` a file that is
    read if present and rewritten after the build; ``outputs`` keeps only these network outputs (for
    DeepStream: ``["probabilities"]``). Both files are written atomically. Returns ``engine_path``.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    trt = _import_tensorrt("needed to build TensorRT engines")
    plan = engine_plan(trt.__version__, fp16)
    if int(workspace_mib) < 1:
        raise EdgehebbError(f"workspace must be at least 1 MiB, got {workspace_mib}")
    model = load_onnx(onnx_path)
    inp = onnx_input(model)
    shapes = profile_shapes(inp, batch)
    if inp.shape[0] is not None and tuple(batch) != (inp.shape[0],) * 3:
        log(f"the ONNX input has a fixed batch of {inp.shape[0]}; the profile uses it instead of {tuple(batch)}")
    nodes = custom_nodes(model)
    if fp16 and not nodes:   # FP32 pins spread from the op's nodes; a --standard-ops file has none left
        raise EdgehebbError(f"{onnx_path} has no ai.edgehebb nodes (a --standard-ops export?), so an FP16 build "
                            f"could not keep the patch-norm/power op in FP32; build from the default export")
    classes = onnx_classes(model)
    exported = {p.key: p.value for p in model.metadata_props if p.key.startswith(op.META_PREFIX)}
    del model
    for note in plan["notes"]:
        log(note)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan["network_flags"]:   # EXPLICIT_BATCH is never needed: 10.0 ignores it, 11 removed it
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that weights stored beside the model are found; errors via
    # num_errors/get_error (OnnxParser: docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/
    # parsers/Onnx/pyOnnx.html; Polygraphy's check_onnx_parser_errors prints them the same way).
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise EdgehebbError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors or 'no details given'}")
    if outputs:
        _keep_outputs(network, outputs)

    config = builder.create_builder_config()
    # IBuilderConfig.set_memory_pool_limit replaced max_workspace_size (removed in 10; 8.x-to-10.x migration).
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if plan["disable_tf32"] and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned: list[str] = []
    if plan["builder_fp16"]:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if plan["fp32_custom_layers"] and nodes:
        pinned, free = _pin_fp32(trt, network, nodes)
        if not free:
            raise EdgehebbError(
                f"--fp16 would change nothing for {onnx_path.name}: every float layer feeds the ai.edgehebb op or "
                f"follows it, and those stay FP32 ({FP16_UNDERFLOW}; FP16 input to it moves the logits ~1e-2); "
                "build without --fp16")
        log(f"fp16: {len(pinned)} layers pinned to FP32 (the ai.edgehebb op, what feeds it and what follows it); "
            f"{len(free)} may run in FP16")
    elif plan["builder_fp16"]:
        log("fp16: the model has no ai.edgehebb op, so TensorRT may run any layer in FP16")
    # One profile over the batch dimension (IOptimizationProfile.set_shape(name, min, opt, max)).
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if cache_path is not None:
        _set_timing_cache(config, cache_path, log)

    log(f"building {plan['precision']} engine with TensorRT {trt.__version__} "
        f"(profile {shapes['min']} .. {shapes['max']}); this takes a while")
    serialized = builder.build_serialized_network(network, config)   # None on failure, reasons in the log
    if serialized is None:
        raise EdgehebbError(f"TensorRT could not build an engine from {onnx_path}; see TensorRT's messages above")
    if cache_path is not None:
        atomic_write(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    atomic_write(engine_path, bytes(memoryview(serialized)))
    atomic_write_json(sidecar_path(engine_path), {
        "format": SIDECAR_FORMAT,
        "engine": engine_path.name,
        "tensorrt": trt.__version__,
        "precision": plan["precision"],
        "device": _device_name(),     # engines run only on the GPU model (and TensorRT version) that built them
        "input": {"name": inp.name, "dtype": inp.dtype, "layout": inp.layout},
        "profile": {k: list(v) for k, v in shapes.items()},
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "classes": classes,
        # the exporter's metadata (spec, baked preprocessing, ...): the runtime needs it without the ONNX file
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path),
                 "metadata": exported},
        "custom_op": {"domain": op.DOMAIN, "nodes": [n for n, _ in nodes], "fp32_layers": len(pinned)},
        "workspace_mib": int(workspace_mib),
        "plan": {k: v for k, v in plan.items() if k != "notes"},
    })
    log(f"wrote {engine_path} and {sidecar_path(engine_path).name}")
    return engine_path


def _device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _torch_dtype(trt_dtype):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    if trt_dtype.name not in table:
        raise EdgehebbError(f"engine tensor type {trt_dtype.name} has no torch equivalent here")
    return table[trt_dtype.name]


class TrtRunner:
    """Runs an engine built by ``build_engine`` on one CUDA device, with torch tensors as device buffers.

    Buffers for the input and every output are allocated once, for the profile's largest batch, and bound
    once (``set_tensor_address``); ``infer`` copies the input in, sets the input shape, enqueues
    ``execute_async_v3`` on the runner's own CUDA stream and waits for it. In steady state it allocates no
    device memory: the outputs it returns are views of the runner's buffers, overwritten by the next call
    (``.clone()`` what you keep).

    Thread safety: a runner holds one execution context and one set of buffers, so it is NOT thread-safe;
    use one runner per thread (or guard one with a lock). Engines are executable code: load only engine
    files you built or received over a trusted channel (TensorRT 10.x-to-11.x Python migration guide,
    "Engine Deserialization and the Trust Boundary").
    """

    def __init__(self, engine_path: str | Path, device: int = 0):
        trt = _import_tensorrt("needed to run TensorRT engines")
        import torch

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise EdgehebbError(f"{engine_path} does not exist")
        if not torch.cuda.is_available():
            raise EdgehebbError("TrtRunner needs a CUDA GPU and a CUDA build of torch; torch sees no GPU")
        meta = read_sidecar(engine_path)
        self.classes: list[str] | None = meta.get("classes")
        self.device = torch.device("cuda", device)
        with torch.cuda.device(self.device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)     # the engine must not outlive its runtime: keep both
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                built = f" (built with TensorRT {meta['tensorrt']} on {meta.get('device')})" if "tensorrt" in meta else ""
                raise EdgehebbError(f"TensorRT {trt.__version__} could not load {engine_path}{built}: an engine loads "
                                    "only on the TensorRT version and GPU model that built it; build it again here")
            self._context = self._engine.create_execution_context()
            # Name-based I/O (num_io_tensors, get_tensor_name/mode/dtype, get_tensor_profile_shape):
            # TensorRT 8.x-to-10.x Python migration, "Migrating I/O Buffer Allocation to Named Tensors".
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            if len(inputs) != 1:
                raise EdgehebbError(f"{engine_path} has inputs {inputs}; edgehebb engines have exactly one")
            self.input_name = inputs[0]
            self.output_names = [n for n in names if n != self.input_name]
            lo, _, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
            self.min_batch, self.max_batch, self.sample_shape = lo[0], hi[0], hi[1:]
            self.input_dtype = _torch_dtype(self._engine.get_tensor_dtype(self.input_name))
            # Output shapes at the largest batch: set the input shape, then ask the context.
            if not self._context.set_input_shape(self.input_name, hi):
                raise EdgehebbError(f"{engine_path}: the engine refused its own profile's largest shape {hi}")
            self._buffers = {self.input_name: torch.empty(hi, dtype=self.input_dtype, device=self.device)}
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                self._buffers[name] = torch.empty(shape, dtype=_torch_dtype(self._engine.get_tensor_dtype(name)),
                                                  device=self.device)
            for name, buf in self._buffers.items():
                # The first n rows of a contiguous (max, ...) buffer start at the same address, so one
                # binding serves every batch size.
                self._context.set_tensor_address(name, buf.data_ptr())
            self._batch = self.max_batch
            self._stream = torch.cuda.Stream(device=self.device)

    def infer(self, inputs) -> dict:
        """Run one batch (torch tensor on any device, or numpy array); returns {output name: tensor view}.

        ``images`` engines take float (N, 3, H, W) in [0, 1]; ``frames`` engines take uint8 (N, H, W, 3).
        The engine's outputs are typically ``logits``, ``probabilities`` and ``features``.
        """
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs)) if isinstance(inputs, np.ndarray) else inputs
        if not isinstance(x, torch.Tensor):
            raise EdgehebbError(f"inputs must be a torch tensor or a numpy array, not {type(inputs).__name__}")
        if self.input_dtype == torch.uint8 and x.dtype != torch.uint8:
            raise EdgehebbError(f"this engine takes uint8 frames (N, {', '.join(map(str, self.sample_shape))}), got {x.dtype}")
        if self.input_dtype != torch.uint8 and not x.is_floating_point():
            raise EdgehebbError(f"this engine takes float images in [0, 1], got {x.dtype}")
        n = check_batch(x.shape, self.sample_shape, self.min_batch, self.max_batch, f"input {self.input_name!r}")
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_stream(caller)     # inputs made on the caller's stream must be ready
            self._buffers[self.input_name][:n].copy_(x, non_blocking=True)
            if n != self._batch:
                if not self._context.set_input_shape(self.input_name, (n, *self.sample_shape)):
                    raise EdgehebbError(f"TensorRT refused input shape {(n, *self.sample_shape)}")
                self._batch = n
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EdgehebbError("TensorRT failed to run the engine; see TensorRT's messages above")
        self._stream.synchronize()
        return {name: self._buffers[name][:n] for name in self.output_names}
