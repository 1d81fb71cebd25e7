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
ops in memory first (:mod:`edgehebb.deploy.onnx_standard`), a ``--standard-ops`` export is read as it is.

Large batches are split: :meth:`Runtime.predict` hands the backend at most ``max_chunk`` frames at a
time (64 on the CPU, 256 on a GPU by default), so memory stays bounded whatever the batch (fig2_left
needs ~3 MB of activations per 32 x 32 frame: 2,048 frames in one call peaked 5.4 GB above the
loaded model with torch, 0.23 GB in chunks of 64). The chunks are as equal as possible, so with
``max_chunk`` >= 3 none is a lone frame: for one row torch's CPU head and ONNX Runtime's convolution
take other kernels, whose last bits differ. With 2 or more frames per chunk each frame's result is
bit for bit the one an unsplit call gives, on torch, ONNX Runtime and OpenCV on the CPU (tested).

Frames of any size are resized (``fit="resize"``) or centre-cropped to the model's aspect and then
resized (``fit="center-crop"``) to the model's input by :func:`edgehebb.deploy.frames.frames_to_tensor`, the same
code for every backend; an ONNX file exported with the preprocessing baked in
(``preprocess="uint8-nhwc"``, the graph's twin of that function) gets the uint8 frames themselves,
and so does a model directory run on ONNX Runtime, which is exported that way.

Float frames are accepted too, if they are in [0, 1]: they are rounded to uint8 (``round(x * 255)``,
the quantisation a camera gives) so that every backend, baked-in preprocessing included, sees the
same input. NaN, infinities and values outside [0, 1] (a frame still in 0..255) raise.

pycuda, tensorrt, onnxruntime and cv2 are imported only when a backend needs them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgehebb.deploy.backends import BACKENDS as BACKEND_CLASSES
from edgehebb.deploy.backends import NoCudaProvider, mismatch
from edgehebb.deploy.backends.onnxruntime_backend import import_onnxruntime
from edgehebb.deploy.frames import CHANNEL_ORDERS, FITS, check_choice
from edgehebb.errors import EdgehebbError
from edgehebb.io import CONFIG_FILE

BACKENDS = ("auto", *BACKEND_CLASSES)
# Frames per backend call when Runtime(max_chunk=None). CPU: ~3 MB of activations per frame for
# fig2_left makes 64 frames ~0.2 GB, and per-frame throughput on the CPU is flat from ~16 frames up.
# GPU: larger batches keep it busy, and 256 is the top of the default TensorRT profile.
DEFAULT_MAX_CHUNK = {"cpu": 64, "cuda": 256}
ENGINE_SUFFIXES = (".engine", ".plan")


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
    from edgehebb.nnl.model import resolve_model

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
        has_cuda = "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()
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
    ratio, ``"resize"`` (stretch) or ``"center-crop"`` (see :func:`edgehebb.deploy.frames.frames_to_tensor`).
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
        reason = mismatch(backend, kind)
        if reason is not None:
            raise EdgehebbError(f"{target}: {reason}")
        self.path, self.backend, self.channel_order, self.fit = target, backend, channel_order, fit
        self.device = _resolve_device(backend, device)
        self._lock = threading.Lock()
        self._tmp: Path | None = None
        make = BACKEND_CLASSES[backend]
        try:
            if backend in ("onnxruntime", "opencv") and kind == "model":
                target = self._export(target, channel_order, fit)
            try:
                self._backend = make(target, self.device, channel_order, fit)
            except NoCudaProvider as e:
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
        from edgehebb.deploy.onnx_export import export_onnx

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
