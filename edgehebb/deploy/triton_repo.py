"""Triton Inference Server model repositories for an edgehebb model (``edgehebb export MODEL --triton REPO``).

One call writes ``REPO/<name>/`` beside whatever else the repository holds:

- ``1/model.onnx``: the model exported with uint8 NHWC ``frames`` baked in
  (:func:`edgehebb.deploy.onnx_export.export_onnx` with ``preprocess="uint8-nhwc"``), so a camera
  client sends its frames as they are and the server does the rest;
- ``config.pbtxt``: Triton's model configuration, its inputs and outputs read back from that file
  (names, types, dims), ``max_batch_size``, ``dynamic_batching`` with preferred batch sizes and a
  queue delay, an ``instance_group``, and ``label_filename`` on ``logits`` and ``probabilities`` so
  Triton's classification extension answers with class names;
- ``labels.txt``: the class names, one a line (index = class id);
- with ``backend="python"``: ``1/model.py``, :mod:`edgehebb.deploy.triton_python_model` copied as
  it is, which runs ``model.onnx`` with ONNX Runtime inside Triton's python backend.

``backend="onnxruntime"`` is what a full Triton install (GPU or CPU) runs; its config also asks the
CUDA provider for IEEE FP32 (``use_tf32`` 0, as ``Runtime`` does: TF32 moved logits by ~1e-2 of a
row's largest and flipped near ties) and, with ``tensorrt=True``, puts ONNX Runtime's TensorRT
accelerator first (FP32 only: the op's cos^40 underflows FP16; an optimisation profile over the batch,
so it needs a fixed frame size). The python backend is for servers without the onnxruntime backend,
such as the one the ``nvidia-pytriton`` wheel carries (:mod:`edgehebb.deploy.triton_server`).

The model's directory is built beside its final place and swapped in whole, so a reader (or a
polling server) sees the old model or the new one, never a mix, and no file of an earlier export
(a stale ``model.py``) survives.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from edgehebb import __version__
from edgehebb.deploy import op
from edgehebb.deploy.frames import CHANNEL_ORDERS, FITS, check_choice
from edgehebb.deploy.onnx_op import MIN_OPSET
from edgehebb.errors import EdgehebbError
from edgehebb.io import _umask, atomic_write

BACKENDS = ("onnxruntime", "python")
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
PYTHON_FILE = "model.py"
VERSION = "1"
DEFAULT_MAX_BATCH = 64            # Runtime's CPU chunk; a GPU takes more (TensorRT's default profile tops at 256)
DEFAULT_PREFERRED = (8, 16, 32)   # batch sizes the batcher waits for (up to the queue delay) before running
DEFAULT_QUEUE_DELAY_US = 1000     # 1 ms: a 30 fps camera's frame lasts 33 ms
TRT_WORKSPACE_BYTES = 1 << 30
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8"}   # onnx TensorProto.FLOAT / UINT8: all an edgehebb export uses
_PYTHON_SOURCE = Path(__file__).with_name("triton_python_model.py")


def check_name(name: str) -> str:
    """A Triton model name that is also a safe directory name, or one line saying why not."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name) or name.endswith(".") or len(name) > 128:
        raise EdgehebbError(f"model name {name!r} is not usable in a Triton repository: use letters, digits, "
                            f"'_', '-' and '.' (not first or last), at most 128 characters (--name NAME)")
    return name


def check_batching(max_batch_size: int, preferred: tuple[int, ...], delay_us: int, instances: int) -> tuple[int, ...]:
    """The preferred batch sizes, sorted; every value checked against ``max_batch_size``."""
    def positive(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not positive(max_batch_size):
        raise EdgehebbError(f"max batch size must be an integer >= 1, got {max_batch_size!r}")
    preferred = tuple(preferred)
    if not all(positive(p) for p in preferred):
        raise EdgehebbError(f"preferred batch sizes must be integers >= 1, got {list(preferred)}")
    if any(p > max_batch_size for p in preferred):
        raise EdgehebbError(f"preferred batch sizes {list(preferred)} must not exceed the max batch size {max_batch_size}")
    if isinstance(delay_us, bool) or not isinstance(delay_us, int) or delay_us < 0:
        raise EdgehebbError(f"max queue delay must be an integer >= 0 microseconds, got {delay_us!r}")
    if not positive(instances):
        raise EdgehebbError(f"instances must be an integer >= 1, got {instances!r}")
    return tuple(sorted(set(preferred)))


def onnx_io(path: Path) -> tuple[list[str], dict, list[dict]]:
    """(class names, the input, the outputs) an edgehebb ONNX file declares; each tensor as
    ``{"name", "data_type", "dims"}`` without the batch dimension (-1 for a dynamic one)."""
    model = op.load_onnx(path)
    meta = op.read_metadata(path, model)
    classes = op.json_metadata(meta, op.META_CLASSES, path)

    def describe(value) -> dict:
        t = value.type.tensor_type
        if t.elem_type not in _TYPES:
            raise EdgehebbError(f"{path}: tensor {value.name!r} has ONNX element type {t.elem_type}, which this "
                                f"repository writer does not map to a Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": value.name, "data_type": _TYPES[t.elem_type], "dims": dims[1:]}   # dims[0]: the batch

    inputs = [describe(v) for v in model.graph.input]
    if len(inputs) != 1 or inputs[0]["name"] != "frames":
        raise EdgehebbError(f"{path} does not take uint8 'frames': export it with --preprocess uint8-nhwc")
    return classes, inputs[0], [describe(v) for v in model.graph.output]


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(t: dict, labels: bool, fmt: str | None = None) -> str:
    lines = [f'    name: "{t["name"]}"', f'    data_type: {t["data_type"]}']
    if fmt:
        lines.append(f"    format: {fmt}")
    lines.append(f"    dims: {_dims(t['dims'])}")
    if labels:
        lines.append(f'    label_filename: "{LABELS_FILE}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def render_config(name: str, backend: str, inp: dict, outputs: list[dict], *, max_batch_size: int,
                  preferred: tuple[int, ...], delay_us: int, instances: int, tensorrt: bool) -> str:
    """config.pbtxt's text (protobuf text format of Triton's ``ModelConfig``), with comments."""
    labelled = ("logits", "probabilities")
    text = [f"# Triton model configuration written by edgehebb {__version__} (edgehebb export MODEL --triton REPO).",
            "# Inputs and outputs are those the ONNX file in 1/ declares; dims leave out the batch.",
            f'name: "{name}"']
    if backend == "onnxruntime":
        text += ['backend: "onnxruntime"', f'default_model_filename: "{ONNX_FILE}"']
    else:
        text += ["# model.py runs 1/model.onnx with ONNX Runtime on the CPU inside the python backend's stub.",
                 'backend: "python"']
    text += [f"max_batch_size: {max_batch_size}",
             "# uint8 NHWC camera frames, " + ("any height and width (-1), resized in the graph"
                                              if -1 in inp["dims"] else "of the one size exported (--frame-size)"),
             "input [\n" + _tensor(inp, False, "FORMAT_NHWC") + "\n]",
             "# label_filename: Triton's classification extension answers with class names from labels.txt",
             "output [\n" + ",\n".join(_tensor(o, o["name"] in labelled) for o in outputs) + "\n]",
             "# Requests from many cameras are batched by the server: it waits up to the queue delay for a",
             "# preferred batch size, and never forms a batch over max_batch_size.",
             "dynamic_batching {",
             f"  preferred_batch_size: {_dims(list(preferred))}" if preferred else "",
             f"  max_queue_delay_microseconds: {delay_us}",
             "}"]
    text = [t for t in text if t]
    if backend == "python":
        text += ["instance_group [ { count: %d, kind: KIND_CPU } ]" % instances,
                 "# ONNX Runtime threads per instance (the stub shares the cores with the server and other instances)",
                 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }']
        return "\n".join(text) + "\n"
    text += ["# No kind: on a GPU where the server has one, else on the CPU.",
             "instance_group [ { count: %d } ]" % instances,
             "optimization { execution_accelerators {",
             "  gpu_execution_accelerator: ["]
    accelerators = []
    if tensorrt:
        h, w, c = inp["dims"]
        shape = lambda n: f'{inp["name"]}:{n}x{h}x{w}x{c}'   # noqa: E731
        opt = max(preferred) if preferred else max_batch_size
        accelerators.append(
            "    # ONNX Runtime's TensorRT accelerator, FP32 only (cos^40 underflows FP16), one profile over the batch\n"
            '    { name: "tensorrt"\n'
            '      parameters { key: "precision_mode" value: "FP32" }\n'
            f'      parameters {{ key: "max_workspace_size_bytes" value: "{TRT_WORKSPACE_BYTES}" }}\n'
            f'      parameters {{ key: "trt_profile_min_shapes" value: "{shape(1)}" }}\n'
            f'      parameters {{ key: "trt_profile_opt_shapes" value: "{shape(opt)}" }}\n'
            f'      parameters {{ key: "trt_profile_max_shapes" value: "{shape(max_batch_size)}" }} }}')
    accelerators.append(
        "    # CUDA provider in IEEE FP32, as edgehebb.Runtime runs it (TF32 flipped near-tied predictions)\n"
        '    { name: "cuda"\n'
        '      parameters { key: "use_tf32" value: "0" } }')
    text += [",\n".join(accelerators), "  ]", "} }"]
    return "\n".join(text) + "\n"


def _model_source(model) -> tuple[object, str | None]:
    """(what export_onnx takes, the default model name or None) for a name, a directory or a (net, config) pair."""
    if isinstance(model, tuple):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        from edgehebb.nnl.model import resolve_model

        path = resolve_model(model)
        return str(path), Path(path).name
    raise EdgehebbError(f"model must be a model directory, a shipped model name or a (net, config) pair, "
                        f"got {type(model).__name__}")


def _check_target(repo: Path, name: str) -> Path:
    if repo.exists() and not repo.is_dir():
        raise EdgehebbError(f"Triton repository {repo} exists and is not a folder")
    target = repo / name
    if target.exists() and not (target.is_dir() and (target / CONFIG_FILE).is_file()):
        raise EdgehebbError(f"{target} exists and is not a Triton model folder (no {CONFIG_FILE}); "
                            f"choose another --name or repository")
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgehebbError(f"cannot create the Triton repository {repo}: {e.strerror or e}") from None
    if not os.access(repo, os.W_OK | os.X_OK):
        raise EdgehebbError(f"cannot write to the Triton repository {repo}")
    return target


def write_repository(model, repo: str | os.PathLike, *, name: str | None = None, backend: str = "onnxruntime",
                     channel_order: str = "rgb", frame_size: tuple[int, int] | None = None, fit: str = "resize",
                     opset: int = MIN_OPSET, max_batch_size: int = DEFAULT_MAX_BATCH,
                     preferred_batch_sizes: tuple[int, ...] = DEFAULT_PREFERRED,
                     max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instances: int = 1,
                     tensorrt: bool = False) -> dict:
    """Write ``model`` into the Triton repository ``repo`` as ``repo/<name>/``; see the module doc.

    ``model``: a model directory, a shipped model's name, or a loaded ``(net, config)`` pair (then
    ``name`` is required). ``name`` defaults to the model directory's name. A folder of that name
    that is a Triton model (has a config.pbtxt) is replaced whole; any other is refused.
    Returns what was written: ``{"repository", "name", "backend", "config", "files", "input",
    "outputs", "classes", "max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "tensorrt"}``.
    """
    check_choice(backend, BACKENDS, "Triton backend")
    check_choice(channel_order, CHANNEL_ORDERS, "channel order")
    check_choice(fit, FITS, "fit")
    preferred = check_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances)
    if tensorrt and backend != "onnxruntime":
        raise EdgehebbError("the TensorRT accelerator is ONNX Runtime's: it applies to the onnxruntime backend only")
    if tensorrt and frame_size is None:
        raise EdgehebbError("the TensorRT accelerator needs a fixed frame size (--frame-size HxW): its optimisation "
                            "profile and engines are built for one input shape range")
    source, default_name = _model_source(model)
    name = check_name(name if name is not None else default_name or "")
    repo = Path(repo).expanduser()
    target = _check_target(repo, name)

    from edgehebb.deploy.onnx_export import export_onnx

    stage = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=repo))
    old = None
    try:
        onnx_path = export_onnx(source, stage / VERSION / ONNX_FILE, preprocess="uint8-nhwc",
                                channel_order=channel_order, frame_size=frame_size, fit=fit, opset=opset)
        classes, inp, outputs = onnx_io(onnx_path)
        bad = [c for c in classes if not c.strip() or "\n" in c or "\r" in c]
        if bad:
            raise EdgehebbError(f"class names {bad!r} cannot be written one per line to {LABELS_FILE}")
        atomic_write(stage / LABELS_FILE, "".join(f"{c}\n" for c in classes).encode())
        config = render_config(name, backend, inp, outputs, max_batch_size=max_batch_size, preferred=preferred,
                               delay_us=max_queue_delay_us, instances=instances, tensorrt=tensorrt)
        atomic_write(stage / CONFIG_FILE, config.encode())
        if backend == "python":
            atomic_write(stage / VERSION / PYTHON_FILE, _PYTHON_SOURCE.read_bytes())
        os.chmod(stage, 0o777 & ~_umask())   # mkdtemp's 0700 would hide the model from a server run as another user
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=repo))
            os.replace(target, old / name)
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / name, target)   # put the earlier model back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    files = sorted(str(p.relative_to(repo)) for p in target.rglob("*") if p.is_file())
    return {"repository": str(repo), "name": name, "backend": backend, "config": str(target / CONFIG_FILE),
            "files": files, "input": inp, "outputs": outputs, "classes": classes, "max_batch_size": max_batch_size,
            "preferred_batch_sizes": list(preferred), "max_queue_delay_us": max_queue_delay_us, "tensorrt": tensorrt}
