"""One inference interface for camera pipelines over torch, ONNX Runtime, OpenCV DNN and TensorRT.

    from edgehebb import Runtime

    with Runtime("fig2_left-cifar10", channel_order="bgr") as rt:   # OpenCV frames are BGR
        pred = rt.predict(frame)           # uint8 (H, W, 3), or a batch (N, H, W, 3); numpy or torch
        print(pred.names[0], pred.probabilities[0].max())

What ``path`` is picks the backend with ``backend="auto"``: a model directory (or the bare name of a
shipped model) runs on torch (CUDA when torch sees a GPU), a ``.onnx`` file on ONNX Runtime, a
``.engine`` / ``.plan`` file on TensorRT. ``backend="onnxruntime"`` also takes a model directory and
exports it to a temporary ONNX file first. ``backend="opencv"`` runs a ``.onnx`` file (or a model
directory, exported likewise) with OpenCV DNN on the CPU: a custom-op file is converted to standard
ops in memory first (:mod:`edgehebb.onnx_standard`), a ``--standard-ops`` export is read as it is.

Large batches are split: :meth:`Runtime.predict` hands the backend at most ``max_chunk`` frames at a
time (64 on the CPU, 256 on a GPU by default), so memory stays bounded whatever the batch (fig2_left
needs ~3 MB of activations per 32 x 32 frame: 2,048 frames in one call peaked 5.4 GB above the
loaded model with torch, 0.23 GB in chunks of 64). The chunks are as equal as possible, so with
``max_chunk`` >= 3 none is a lone frame: for one row torch's CPU head and ONNX Runtime's convolution
take other kernels, whose last bits differ. With 2 or more frames per chunk each frame's result is
bit for bit the one an unsplit call gives, on torch, ONNX Runtime and OpenCV on the CPU (tested).

Frames of any size are resized (``fit="resize"``) or centre-cropped to the model's aspect and then
resized (``fit="center-crop"``) to the model's input by :func:`edgehebb.frames.frames_to_tensor`, the same
code for every backend; an ONNX file exported with the preprocessing baked in
(``preprocess="uint8-nhwc"``, the graph's twin of that function) gets the uint8 frames themselves,
and so does a model directory run on ONNX Runtime, which is exported that way.

Float frames are accepted too, if they are in [0, 1]: they are rounded to uint8 (``round(x * 255)``,
the quantisation a camera gives) so that every backend, baked-in preprocessing included, sees the
same input. NaN, infinities and values outside [0, 1] (a frame still in 0..255) raise.

pycuda, tensorrt, onnxruntime and cv2 are imported only when a backend needs them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgehebb.errors import EdgehebbError, missing_dependency
from edgehebb.frames import CHANNEL_ORDERS, FITS, check_choice, crop_box, frames_to_tensor
from edgehebb.io import CONFIG_FILE

BACKENDS = ("auto", "torch", "onnxruntime", "opencv", "tensorrt")
# Frames per backend call when Runtime(max_chunk=None). CPU: ~3 MB of activations per frame for
# fig2_left makes 64 frames ~0.2 GB, and per-frame throughput on the CPU is flat from ~16 frames up.
# GPU: larger batches keep it busy, and 256 is the top of the default TensorRT profile.
DEFAULT_MAX_CHUNK = {"cpu": 64, "cuda": 256}
OP_VERSIONS = ("1", "2")          # every edgehebb.op_version this runtime runs (2: with sigma, OP_SPEC.md)
ENGINE_SUFFIXES = (".engine", ".plan")
_CACHED_SHAPES = 4                # input buffers kept per Runtime: a stream has one shape, a bench a few


@dataclass
class Prediction:
    """What :meth:`Runtime.predict` returns for N frames (numpy arrays on the host)."""

    class_ids: np.ndarray             # int64 (N,)
    probabilities: np.ndarray         # float32 (N, classes), softmax of the logits
    names: list[str]                  # class name of each frame's prediction
    features: np.ndarray | None = None  # float32 (N, D) pooled block outputs, with features=True

    def __len__(self) -> int:
        return len(self.class_ids)


# ----------------------------------------------------------------------------- frames

def check_frames(frames) -> np.ndarray | torch.Tensor:
    """uint8 (N, H, W, 3) frames (numpy or torch, device kept) from one frame or a batch; see the module doc."""
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        raise EdgehebbError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    shape = tuple(frames.shape)
    if frames.ndim not in (3, 4):
        raise EdgehebbError(f"frames must be one frame (H, W, 3) or a batch (N, H, W, 3), got ndim {frames.ndim} "
                            f"(shape {shape})")
    if shape[-1] != 3:
        hint = " (channels first? transpose to (..., H, W, 3))" if shape[-3] == 3 else ""
        raise EdgehebbError(f"frames must have 3 colour channels in the last axis, got {shape[-1]} "
                            f"(shape {shape}){hint}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[0] == 0:
        raise EdgehebbError(f"empty batch: frames of shape {shape} hold no frame")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise EdgehebbError(f"frames have no pixels (shape {shape})")
    dtype = frames.dtype
    if isinstance(frames, np.ndarray):
        is_uint8, is_float = dtype == np.uint8, dtype.kind == "f"
    else:
        is_uint8, is_float = dtype == torch.uint8, dtype.is_floating_point
    if is_uint8:
        return frames
    if is_float:
        return _quantise(frames, shape)
    raise EdgehebbError(f"frames must be uint8 (0..255) or float in [0, 1], got dtype {dtype}")


def _quantise(frames, shape) -> np.ndarray | torch.Tensor:
    """Float frames in [0, 1] -> uint8, rounded; NaN, inf and out-of-range values raise."""
    if isinstance(frames, np.ndarray):
        finite, lo, hi = bool(np.isfinite(frames).all()), float(frames.min()), float(frames.max())
    else:
        finite, lo, hi = bool(torch.isfinite(frames).all()), float(frames.min()), float(frames.max())
    if not finite:
        raise EdgehebbError(f"float frames of shape {shape} contain NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise EdgehebbError(f"float frames must be in [0, 1], got values in [{lo:g}, {hi:g}] "
                            f"(0..255 floats: divide by 255 or pass uint8)")
    if isinstance(frames, np.ndarray):
        return np.rint(frames.astype(np.float32) * 255).astype(np.uint8)
    return (frames.float() * 255).round_().to(torch.uint8)


class _LruCache(OrderedDict):
    """At most ``_CACHED_SHAPES`` entries, so a stream of changing frame sizes cannot pile up buffers."""

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = make()
            while len(self) > _CACHED_SHAPES:
                self.popitem(last=False)
        return self[key]


# ----------------------------------------------------------------------------- backends
# Each backend: prepare(uint8 NHWC frames) -> model input where the model runs; forward(input) ->
# outputs left where they were computed; fetch(outputs, features) -> host numpy; synchronize().

class _Staging:
    """uint8 frames copied into a reusable buffer per shape on ``device`` (via a pinned host copy on CUDA).

    Frames already on a GPU are used in place when they are on ``device``.
    """

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:   # "cuda" -> "cuda:N", to compare with a tensor's device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self._buffers = device, _LruCache()

    def put(self, frames) -> torch.Tensor:
        if isinstance(frames, torch.Tensor) and frames.device == self.device and self.device.type != "cpu":
            return frames
        cuda = self.device.type == "cuda"

        def make():
            host = torch.empty(tuple(frames.shape), dtype=torch.uint8, pin_memory=cuda)
            return host, (torch.empty_like(host, device=self.device) if cuda else host)

        host, dev = self._buffers.get_or_make(tuple(frames.shape), make)
        if isinstance(frames, torch.Tensor) and frames.device.type != "cpu":
            return dev.copy_(frames)   # from another GPU (or to the host): no host staging
        if isinstance(frames, torch.Tensor):
            host.copy_(frames)
        else:
            np.copyto(host.numpy(), frames)
        if cuda:
            # asynchronous from pinned memory; every backend synchronises before returning results,
            # so ``host`` is free again by the next call
            dev.copy_(host, non_blocking=True)
        return dev

    def clear(self) -> None:
        self._buffers.clear()


class _TorchBackend:
    name = "torch"
    min_batch, max_batch = 1, None
    frame_size = None   # takes frames of any size

    def __init__(self, model_dir: Path, device: str, channel_order: str, fit: str):
        from edgehebb.model import load_model

        self.device = torch.device(device)
        self.net, config = load_model(model_dir, self.device)
        self.classes = [str(c) for c in config["classes"]]
        _, h, w = config["spec"]["input"]
        self.input_size = (int(h), int(w))
        self.channel_order, self.fit = channel_order, fit
        self._staging = _Staging(self.device)

    @torch.inference_mode()
    def prepare(self, frames) -> torch.Tensor:
        return frames_to_tensor(self._staging.put(frames), self.input_size, self.channel_order, self.fit)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.net.features(x)
        logits = self.net.classify(feats)
        return {"logits": logits, "probabilities": logits.softmax(1), "features": feats}

    def fetch(self, out: dict, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        probs = out["probabilities"].float().cpu().numpy()   # .cpu() synchronises the stream
        return probs, (out["features"].float().cpu().numpy() if features else None)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._staging.clear()
        self.net = None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise missing_dependency("onnxruntime", why="the onnxruntime backend runs .onnx files") from None
    return onnxruntime


def _load_onnx(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise EdgehebbError(f"{path} is not an ONNX model: {e}") from None


def read_onnx_metadata(path: Path, model=None) -> dict[str, str]:
    """The edgehebb metadata of an ONNX file (``model``: the file already loaded); errors for a file that is
    not an edgehebb export or has another op version."""
    model = _load_onnx(path) if model is None else model
    meta = {p.key: p.value for p in model.metadata_props}
    if not model.graph.node or "edgehebb.classes" not in meta:
        raise EdgehebbError(f"{path} is not an edgehebb ONNX export (no graph or no edgehebb.classes metadata); "
                            f"export one with `edgehebb export`")
    version = meta.get("edgehebb.op_version")
    if version not in OP_VERSIONS:
        raise EdgehebbError(f"{path} uses edgehebb op version {version!r}, but this edgehebb runs versions "
                            f"{', '.join(OP_VERSIONS)}: re-export the model with this edgehebb")
    return meta


def _json_meta(meta: dict, key: str, path: Path):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise EdgehebbError(f"{path}: metadata {key!r} is missing or not JSON ({e})") from None


class _OnnxFile:
    """What the ONNX Runtime and OpenCV backends share: an edgehebb .onnx file's metadata, and its
    input made on the host (uint8 frames for baked-in preprocessing, else float images)."""

    def _describe(self, path: Path, meta: dict, input_name: str, dims: list, channel_order: str, fit: str) -> None:
        self.classes = [str(c) for c in _json_meta(meta, "edgehebb.classes", path)]
        _, h, w = _json_meta(meta, "edgehebb.spec", path)["input"]
        self.input_size = (int(h), int(w))
        self.input_name = input_name
        # Baked-in preprocessing: the graph takes uint8 frames (N, h, w, 3) and resizes them itself.
        self.baked = input_name == "frames"
        self.channel_order, self.fit = channel_order, fit
        self.flip = _check_baked(meta, channel_order, fit, path) if self.baked else False
        self.frame_size = None          # (H, W) when the file takes frames of one size only
        if self.baked:
            self._frame_dims = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:3])
            if None not in self._frame_dims:
                self.frame_size = self._frame_dims
        self._staging = _Staging(torch.device("cpu"))   # preprocessing runs on the host

    def host_input(self, frames) -> np.ndarray:
        if self.baked:
            x = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
            want = self._frame_dims
            if any(d is not None and d != s for d, s in zip(want, x.shape[1:3])):
                raise EdgehebbError(f"this ONNX file takes frames of {want[0]}x{want[1]} (H x W), got "
                                    f"{x.shape[1]}x{x.shape[2]}")
            if self.fit == "center-crop":
                crop_box(x.shape[1], x.shape[2], self.input_size)  # the graph's crop must not be empty
            return np.ascontiguousarray(x[..., ::-1] if self.flip else x, dtype=np.uint8)
        x = frames_to_tensor(self._staging.put(frames), self.input_size, self.channel_order, self.fit).numpy()
        return np.ascontiguousarray(x, dtype=np.float32)


class _OrtHandle:
    """One input shape's IOBinding, its input OrtValue (refilled in place each call) and outputs."""

    def __init__(self, ort, session, input_name: str, shape: tuple, dtype, device: str):
        self.binding = session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
        self.binding.bind_ortvalue_input(input_name, self.input)
        for o in session.get_outputs():
            self.binding.bind_output(o.name, device, 0)   # ORT's arena reuses output memory between runs
        self.output_names = [o.name for o in session.get_outputs()]


class _NoCudaProvider(EdgehebbError):
    """ONNX Runtime lists its CUDA provider but cannot start it here (no GPU, CUDA or cuDNN libraries)."""


class _OrtBackend(_OnnxFile):
    name = "onnxruntime"
    min_batch, max_batch = 1, None

    def __init__(self, onnx_path: Path, device: str, channel_order: str, fit: str):
        ort = _import_onnxruntime()
        self._ort = ort
        meta = read_onnx_metadata(onnx_path)
        self.device = device
        # No TF32 on CUDA: it rounds the head's inputs to 10-bit mantissas (~1e-3 relative), enough to
        # flip near-tied predictions against the torch and CPU results.
        providers = ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if device == "cuda"
                     else ["CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.log_severity_level = 3   # ORT's warnings (e.g. unused initialisers) are not the user's business
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgehebbError(f"onnxruntime cannot load {onnx_path}: {first}") from None
        self.providers = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            # ORT falls back to the CPU silently when the CUDA provider cannot load (e.g. no cuDNN)
            raise _NoCudaProvider(f"onnxruntime could not start its CUDAExecutionProvider for {onnx_path} (are the "
                                f"CUDA and cuDNN libraries onnxruntime-gpu needs installed?); use device='cpu'")
        inp = self.session.get_inputs()[0]
        self._describe(onnx_path, meta, inp.name, inp.shape, channel_order, fit)
        self._handles = _LruCache()

    def prepare(self, frames) -> _OrtHandle:
        x = self.host_input(frames)
        handle = self._handles.get_or_make(x.shape, lambda: _OrtHandle(
            self._ort, self.session, self.input_name, x.shape, x.dtype, self.device))
        handle.input.update_inplace(x)   # host -> the bound input buffer (on the GPU with CUDA)
        return handle

    def forward(self, handle: _OrtHandle) -> dict:
        self.session.run_with_iobinding(handle.binding)
        handle.binding.synchronize_outputs()
        return dict(zip(handle.output_names, handle.binding.get_outputs()))

    def fetch(self, out: dict, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if features and "features" not in out:
            raise EdgehebbError("this ONNX file has no 'features' output; re-export it with `edgehebb export`")
        # copy: a CPU OrtValue's numpy() is a view of memory the next run may reuse
        probs = np.array(out["probabilities"].numpy(), dtype=np.float32, copy=True)
        return probs, (np.array(out["features"].numpy(), dtype=np.float32, copy=True) if features else None)

    def synchronize(self) -> None:
        pass  # run_with_iobinding returns after the outputs are synchronised

    def close(self) -> None:
        self._handles.clear()
        self._staging.clear()
        self.session = None


def _import_cv2():
    try:
        import cv2
    except ModuleNotFoundError:
        raise missing_dependency("opencv-python-headless", why="the opencv backend runs .onnx files with "
                                 "OpenCV DNN") from None
    except ImportError as e:   # e.g. opencv-python without the GUI libraries it links
        raise EdgehebbError(f"cv2 is installed but cannot be imported ({e}); install it with: pip install "
                            f"opencv-python-headless") from None
    return cv2


class _OpenCVBackend(_OnnxFile):
    """OpenCV DNN (``cv2.dnn``, its default engine) on the CPU. OpenCV ignores model-local functions, so a
    custom-op file is converted to standard ops in memory first; a ``--standard-ops`` export is read as it
    is. OpenCV runs on its own thread pool, all cores by default: ``cv2.setNumThreads(n)`` sets it for
    the whole process (on cores shared with other jobs, fewer threads are often faster)."""

    name = "opencv"
    min_batch, max_batch = 1, None

    def __init__(self, onnx_path: Path, device: str, channel_order: str, fit: str):
        cv2 = _import_cv2()
        from edgehebb.onnx_standard import standard_ops, uses_custom_ops

        model = _load_onnx(onnx_path)
        meta = read_onnx_metadata(onnx_path, model)
        if uses_custom_ops(model):
            model = standard_ops(model)
        self.device = device
        inp = model.graph.input[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        self._describe(onnx_path, meta, inp.name, dims, channel_order, fit)
        self.output_names = [o.name for o in model.graph.output]   # OpenCV's new engine returns all or none
        read = getattr(cv2.dnn, "readNetFromONNXBuffer", cv2.dnn.readNetFromONNX)   # OpenCV 4 / OpenCV 5
        try:
            self.net = read(np.frombuffer(model.SerializeToString(), np.uint8))
        except cv2.error as e:
            raise EdgehebbError(f"OpenCV {cv2.__version__} cannot load {onnx_path}: {_one_line(e)}") from None
        self._cv2 = cv2

    def prepare(self, frames) -> np.ndarray:
        return self.host_input(frames)

    def forward(self, x: np.ndarray) -> dict:
        self.net.setInput(x, self.input_name)
        try:
            outs = self.net.forward(self.output_names)
        except self._cv2.error as e:
            raise EdgehebbError(f"OpenCV DNN failed on input {x.dtype} {tuple(x.shape)}: {_one_line(e)}") from None
        return dict(zip(self.output_names, outs))

    def fetch(self, out: dict, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        probs = np.array(out["probabilities"], dtype=np.float32, copy=True)
        return probs, (np.array(out["features"], dtype=np.float32, copy=True) if features else None)

    def synchronize(self) -> None:
        pass   # forward() returns finished host arrays

    def close(self) -> None:
        self._staging.clear()
        self.net = None


def _one_line(e: Exception, most: int = 400) -> str:
    """A native library's multi-line message (OpenCV's: source location, then the reason) as one line."""
    text = " ".join(line.strip(" >") for line in str(e).splitlines() if line.strip(" >")) or type(e).__name__
    return text if len(text) <= most else text[:most - 3] + "..."


def _check_baked(meta: dict, channel_order: str, fit: str, path: Path) -> bool:
    """Whether frames must have R and B swapped before a graph with baked-in preprocessing; a fit it cannot do raises."""
    try:
        baked = json.loads(meta.get("edgehebb.preprocess", "{}"))
    except json.JSONDecodeError:
        baked = {}
    baked = baked if isinstance(baked, dict) else {}
    if baked.get("fit", fit) != fit:
        raise EdgehebbError(f"{path} has fit={baked['fit']!r} baked in; pass fit={baked['fit']!r} or export "
                            f"without baked preprocessing")
    return baked.get("channel_order", "rgb") != channel_order   # swapping on our side is one cheap flip


class _TrtBackend:
    name = "tensorrt"

    def __init__(self, engine: Path, device: str, channel_order: str, fit: str):
        if importlib.util.find_spec("tensorrt") is None:
            raise missing_dependency("tensorrt", "gpu", why="the tensorrt backend runs .engine files")
        from edgehebb.tensorrt_engine import TrtRunner, sidecar_path

        self.device = torch.device(device)
        self.runner = TrtRunner(engine, self.device.index or 0)   # checks the GPU, the file and the sidecar
        self.classes = [str(c) for c in (self.runner.classes or [])]
        if not self.classes:
            raise EdgehebbError(f"{engine} has no class names: its sidecar {sidecar_path(engine).name} is missing "
                                f"or incomplete; rebuild it with `edgehebb export --trt`")
        self.min_batch, self.max_batch = self.runner.min_batch, self.runner.max_batch
        self.channel_order, self.fit, self.flip = channel_order, fit, False
        self.baked = self.runner.input_dtype == torch.uint8   # a ``frames`` engine: preprocessing inside
        if self.baked:
            # Which channel order / fit were baked in: the sidecar's copy of the ONNX metadata, or the ONNX file.
            meta = _source_onnx_metadata(engine, sidecar_path(engine))
            if meta is None:
                raise EdgehebbError(f"{engine} takes uint8 frames with preprocessing baked in, but neither its sidecar "
                                    f"nor an ONNX file beside it says which channel order and fit: rebuild it with "
                                    f"`edgehebb export --trt`, or copy the ONNX file next to the engine")
            self.flip = _check_baked(meta, channel_order, fit, engine)
            _, h, w = json.loads(meta["edgehebb.spec"])["input"]
        else:
            _, h, w = self.runner.sample_shape
        self.input_size = (int(h), int(w))
        # a frames engine has one frame size (TensorRT profiles fix all but the batch): (H, W, 3)
        self.frame_size = tuple(int(d) for d in self.runner.sample_shape[:2]) if self.baked else None
        self._staging = _Staging(self.device)

    def prepare(self, frames) -> torch.Tensor:
        x = self._staging.put(frames)
        if self.baked:
            if self.fit == "center-crop":
                crop_box(x.shape[1], x.shape[2], self.input_size)  # the engine's crop must not be empty
            return x.flip(-1) if self.flip else x
        return frames_to_tensor(x, self.input_size, self.channel_order, self.fit)

    def forward(self, x: torch.Tensor) -> dict:
        return self.runner.infer(x)   # synchronous; the outputs are views the next call overwrites

    def fetch(self, out: dict, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        probs = out["probabilities"].float().cpu().numpy()
        return probs, (out["features"].float().cpu().numpy() if features else None)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._staging.clear()
        self.runner = None


def _source_onnx_metadata(engine: Path, sidecar: Path) -> dict | None:
    """edgehebb metadata of the ONNX file an engine was built from: the copy in the sidecar (engines
    built since the sidecar carried it), else the ONNX file itself if it lies beside the engine."""
    try:
        source = json.loads(sidecar.read_text())["onnx"]
        name = source["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(source.get("metadata"), dict) and "edgehebb.spec" in source["metadata"]:
        return {str(k): str(v) for k, v in source["metadata"].items()}
    onnx_path = engine.parent / name
    return read_onnx_metadata(onnx_path) if onnx_path.is_file() else None


# ----------------------------------------------------------------------------- the runtime

def resolve_target(path) -> tuple[str, Path]:
    """("model" | "onnx" | "engine", path) for a model directory, shipped model name, .onnx or engine file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file():
            raise EdgehebbError(f"{p} is a directory but not a model directory (no {CONFIG_FILE})")
        return "model", p
    if p.is_file():
        if p.suffix.lower() == ".onnx":
            return "onnx", p
        if p.suffix.lower() in ENGINE_SUFFIXES:
            return "engine", p
        raise EdgehebbError(f"{p} is not a model: expected a model directory, a .onnx file or a TensorRT "
                            f"{'/'.join(ENGINE_SUFFIXES)} engine")
    text = str(path)
    if "/" in text or "\\" in text or p.suffix.lower() in (".onnx", *ENGINE_SUFFIXES):
        raise EdgehebbError(f"{p} does not exist")
    from edgehebb.model import resolve_model

    return "model", resolve_model(text)   # a shipped model's name; its error lists the shipped ones


def _resolve_device(backend: str, device: str | None) -> str:
    if device not in (None, "auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", str(device)):
        raise EdgehebbError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if backend == "tensorrt":
        if device not in (None, "auto") and not str(device).startswith("cuda"):
            raise EdgehebbError(f"the tensorrt backend runs on CUDA only, not on {device!r}")
        return "cuda" if device in (None, "auto") else str(device)
    if backend == "opencv":
        if device not in (None, "auto", "cpu"):
            raise EdgehebbError(f"the opencv backend runs on the CPU only (OpenCV's DNN engine for ONNX has no "
                                f"GPU back-end), not on {device!r}")
        return "cpu"
    if backend == "onnxruntime":
        has_cuda = "CUDAExecutionProvider" in _import_onnxruntime().get_available_providers()
        if device in (None, "auto"):
            return "cuda" if has_cuda else "cpu"
        if str(device).startswith("cuda") and not has_cuda:
            raise EdgehebbError(f"device {device!r} asked for, but onnxruntime has no CUDAExecutionProvider "
                                f"(install onnxruntime-gpu: pip install 'edgehebb[gpu]')")
        if str(device) not in ("cpu", "cuda"):
            raise EdgehebbError(f"the onnxruntime backend takes device 'cpu' or 'cuda', got {device!r}")
        return str(device)
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EdgehebbError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return str(device)


def chunks(n: int, most: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest slices of ``n`` frames with at most ``most`` each, as equal as possible
    (sizes differ by at most one frame, so no lone frame trails full chunks)."""
    k = -(-n // most)
    bounds = [i * n // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class Runtime:
    """Run an edgehebb model on camera frames with torch, ONNX Runtime, OpenCV DNN or TensorRT; see the module doc.

    ``path``: a model directory or shipped model name, a ``.onnx`` file, or a ``.engine`` / ``.plan``
    file. ``backend``: ``auto`` (chosen from ``path``), ``torch``, ``onnxruntime``, ``opencv`` or ``tensorrt``.
    ``device``: ``None`` (CUDA when the backend can use it), ``"cpu"``, ``"cuda"`` (``"cuda:N"`` for torch).
    ``channel_order``: ``"rgb"`` or ``"bgr"`` (OpenCV). ``fit``: how frames meet the model's aspect
    ratio, ``"resize"`` (stretch) or ``"center-crop"`` (see :func:`edgehebb.frames.frames_to_tensor`).
    ``max_chunk``: the most frames one backend call gets; :meth:`predict` splits larger batches
    (``None``: 64 on the CPU, 256 on CUDA, ``DEFAULT_MAX_CHUNK``). Peak memory grows with it, by
    ~3 MB per 32 x 32 frame for fig2_left.

    Steady-state inference allocates no new input buffers: each backend keeps one input buffer per
    frame shape (torch: a pinned host copy and a device copy on CUDA; ONNX Runtime: an IOBinding
    whose input lives on the GPU with CUDA), for the last few shapes seen.

    Thread safety: those buffers are shared state, so :meth:`predict` holds a per-instance lock;
    sharing one Runtime between threads is safe but runs their calls one at a time. For parallel
    inference use one Runtime per thread (each has its own buffers; on CUDA they share the GPU).
    :meth:`prepare` / :meth:`forward` (for benchmarks) take no lock: call them from one thread.
    The returned :class:`Prediction` arrays are the caller's own (never views of the buffers).
    """

    def __init__(self, path, backend: str = "auto", device: str | None = None, *,
                 channel_order: str = "rgb", fit: str = "resize", max_chunk: int | None = None):
        if backend not in BACKENDS:
            raise EdgehebbError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        check_choice(channel_order, CHANNEL_ORDERS, "channel order")
        check_choice(fit, FITS, "fit")
        if max_chunk is not None and (isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1):
            raise EdgehebbError(f"max_chunk must be an integer >= 1 (frames per backend call), got {max_chunk!r}")
        kind, target = resolve_target(path)
        if backend == "auto":
            backend = {"model": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}[kind]
        if backend == "torch" and kind != "model":
            raise EdgehebbError(f"the torch backend needs a model directory, not {target} (use backend='auto')")
        if backend in ("onnxruntime", "opencv") and kind == "engine":
            raise EdgehebbError(f"{target} is a TensorRT engine: use backend='tensorrt'")
        if backend == "tensorrt" and kind != "engine":
            raise EdgehebbError(f"the tensorrt backend needs a .engine file, not {target}: build one with "
                                f"`edgehebb export --trt`")
        self.path, self.backend, self.channel_order, self.fit = target, backend, channel_order, fit
        self.device = _resolve_device(backend, device)
        self._lock = threading.Lock()
        self._tmp: Path | None = None
        make = {"torch": _TorchBackend, "onnxruntime": _OrtBackend, "opencv": _OpenCVBackend,
                "tensorrt": _TrtBackend}[backend]
        try:
            if backend in ("onnxruntime", "opencv") and kind == "model":
                target = self._export(target, channel_order, fit)
            try:
                self._backend = make(target, self.device, channel_order, fit)
            except _NoCudaProvider as e:
                if device not in (None, "auto"):  # asked for CUDA: say why it cannot have it
                    raise
                warnings.warn(f"{e}; running on the CPU", stacklevel=2)
                self.device = "cpu"
                self._backend = make(target, self.device, channel_order, fit)
        except BaseException:
            self.close()
            raise
        self.classes: list[str] = self._backend.classes
        self.input_size: tuple[int, int] = self._backend.input_size   # (H, W) frames are resized to
        self.max_batch: int | None = self._backend.max_batch          # a TensorRT profile's limit; None: any
        self.min_batch: int = self._backend.min_batch                  # a TensorRT profile's smallest batch
        # (H, W) of the only frames the model takes (a file with preprocessing baked in at a fixed
        # --frame-size); None: frames of any size, resized or cropped to input_size
        self.frame_size: tuple[int, int] | None = self._backend.frame_size
        self.max_chunk: int = max_chunk or DEFAULT_MAX_CHUNK["cuda" if self.device.startswith("cuda") else "cpu"]

    def _export(self, model_dir: Path, channel_order: str, fit: str) -> Path:
        """The model exported to a temporary .onnx, removed by close() (or when the Runtime is collected).

        The preprocessing goes into the graph (uint8 frames in): no torch work beside ONNX Runtime's (or
        OpenCV's) in the hot path. On the CPU, torch's OpenMP threads keep spinning after a torch op and starve
        ONNX Runtime's pool (measured: 8 ms instead of 1.4 ms per batch of 32 on 16 cores), and on
        CUDA a quarter of the bytes cross to the GPU.
        """
        from edgehebb.onnx_export import export_onnx

        self._tmp = Path(tempfile.mkdtemp(prefix="edgehebb-runtime-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        return Path(export_onnx(str(model_dir), self._tmp / "model.onnx", preprocess="uint8-nhwc",
                                channel_order=channel_order, fit=fit))

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's execution providers in use ([] for the other backends)."""
        return list(getattr(self._backend, "providers", []))

    def predict(self, frames, *, features: bool = False) -> Prediction:
        """Class ids, probabilities and names (and, with ``features``, pooled features) of 1 or N frames.

        More than ``max_chunk`` frames (or than a TensorRT profile's largest batch) run as several
        backend calls of equal size: see the module doc.
        """
        frames = check_frames(frames)
        most = min(self.max_chunk, self.max_batch or self.max_chunk)
        with self._lock:
            backend = self._open()
            parts = [self._run(backend, frames[lo:hi], features) for lo, hi in chunks(len(frames), most)]
        probs = np.concatenate([p for p, _ in parts])
        feats = np.concatenate([f for _, f in parts]) if features else None
        ids = probs.argmax(1).astype(np.int64)
        return Prediction(ids, probs, [self.classes[i] for i in ids], feats)

    def _run(self, backend, frames, features: bool):
        n = len(frames)
        if n < self.min_batch:  # below an engine profile's smallest batch: pad with the last frame, drop after
            extra = self.min_batch - n
            frames = (np.concatenate([frames, np.repeat(frames[-1:], extra, axis=0)]) if isinstance(frames, np.ndarray)
                      else torch.cat([frames, frames[-1:].expand(extra, *frames.shape[1:])]))
        probs, feats = backend.fetch(backend.forward(backend.prepare(frames)), features)
        return probs[:n], (feats[:n] if feats is not None else None)

    def prepare(self, frames):
        """For benchmarks: frames checked, preprocessed and copied to where the model runs.

        The result lives in this Runtime's reused input buffers: it is valid until the next
        ``prepare`` or ``predict`` call, which overwrites it.
        """
        return self._open().prepare(check_frames(frames))

    def forward(self, prepared):
        """For benchmarks: run the model on :meth:`prepare` output; outputs stay on the device (not synchronised)."""
        return self._open().forward(prepared)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""
        self._open().synchronize()

    def _open(self):
        if self._backend is None:
            raise EdgehebbError("this Runtime is closed")
        return self._backend

    def close(self) -> None:
        """Release the model and buffers (and a temporary ONNX export); the Runtime is unusable after."""
        backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None:
            backend.close()
        if self._tmp is not None:
            self._cleanup()
            self._tmp = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Runtime({str(self.path)!r}, backend={self.backend!r}, device={self.device!r})"
