"""One inference interface for camera pipelines over torch, ONNX Runtime, OpenCV DNN and TensorRT.

    from edgehebb import Runtime

    with Runtime("fig2_left-cifar10", channel_order="bgr") as rt:   # OpenCV frames are BGR
        pred = rt.predict(frame)           # uint8 (H, W, 3), a batch (N, H, W, 3) or a list of frames
        print(pred.names[0], pred.probabilities[0].max())

Which backend. ``backend="auto"`` takes the fastest that can run ``path`` here: a model directory (or
a shipped model's name) runs on torch on a CUDA GPU, and on the CPU on the fastest installed CPU
backend (:data:`edgehebb.deploy.backends.CPU_SPEED_ORDER`, measured by ``tools/bench_runtime.py``:
ONNX Runtime, then torch, then OpenCV); a ``.onnx`` file runs on ONNX Runtime (CUDA when
onnxruntime-gpu sees a GPU); a ``.engine`` / ``.plan`` file on TensorRT. ``repr(runtime)`` and
:attr:`Runtime.why` say which was picked and why. ``backend="onnxruntime"`` or ``"opencv"`` also take a
model directory and export it to a temporary ONNX file with the preprocessing baked in; OpenCV DNN
converts a custom-op file to standard ops in memory (:mod:`edgehebb.deploy.onnx_standard`).

Batches are split: :meth:`Runtime.predict` hands the backend at most ``max_chunk`` frames at a time, by
default the size that measured fastest per frame for that backend on the CPU (the cosine map of
fig2_left is 1.3 MB per 32 x 32 frame, and a batch whose maps leave the cache runs up to 3x slower per
frame) and 256 on a GPU. Memory stays bounded whatever the batch. The chunks are as equal as possible,
so with ``max_chunk`` >= 3 none is a lone frame: for one row torch's CPU head and ONNX Runtime's
convolution take other kernels, whose last bits differ. With 2 or more frames per chunk each frame's
result is bit for bit the one an unsplit call gives on torch and ONNX Runtime; OpenCV DNN gives the same
bits only with one thread (``threads=1``): with several, its split of the work depends on the batch
size and the last bits can differ (within OP_SPEC's tolerance; tests/test_runtime.py says so).

Frames. One frame (H, W, 3), a batch (N, H, W, 3), or a list of frames (frames of one size are
batched together, each size goes through the fit policy on its own), uint8 or float in [0, 1] (rounded
to uint8), numpy or torch: :mod:`edgehebb.deploy.frames`. They are resized (``fit="resize"``) or
centre-cropped to the model's aspect and then resized (``fit="center-crop"``) to the model's input, the
same code for every backend (baked into the graph for an ONNX file exported with ``uint8-nhwc``). A
frame smaller than the model's input would be stretched up; it is refused unless ``upscale=True``.

Threads. ``threads=None`` leaves each engine's own thread count (torch's and OpenCV's process-wide
settings, ONNX Runtime's default of one per core). ``threads=N`` runs this Runtime's work on N threads:
ONNX Runtime's session gets N intra-op threads; torch's and OpenCV's counts are process-wide, so they
are set to N for the length of each call and set back after it.

pycuda, tensorrt, onnxruntime and cv2 are imported only when a backend needs them.
"""

from __future__ import annotations

import contextlib
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
from edgehebb.deploy.backends import NoCudaProvider, choose, mismatch
from edgehebb.deploy.backends.onnxruntime_backend import import_onnxruntime
from edgehebb.deploy.frames import (CHANNEL_ORDERS, FITS, check_choice, check_frames, check_not_upscaled,
                                    group_frames)
from edgehebb.errors import EdgehebbError
from edgehebb.io import CONFIG_FILE

BACKENDS = ("auto", *BACKEND_CLASSES)
# Frames per backend call on CUDA when Runtime(max_chunk=None): larger batches keep a GPU busy, and 256
# is the top of the default TensorRT profile. On the CPU each backend's own measured size (cpu_chunk), cut
# for a model with larger cosine maps (Backend.cpu_batch).
CUDA_MAX_CHUNK = 256
ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass
class Prediction:
    """What :meth:`Runtime.predict` returns for N frames, in the order they were given (host numpy arrays,
    the caller's own: never views of the Runtime's buffers)."""

    class_ids: np.ndarray             # int64 (N,): argmax of each frame's probabilities, index into names
    probabilities: np.ndarray         # float32 (N, classes): softmax of the logits, each row sums to 1
    names: list[str]                  # the class name of each frame's prediction (Runtime.classes[id])
    features: np.ndarray | None = None  # float32 (N, D): the pooled block outputs before the head
                                        # (models/MODEL_FORMAT.md step 4), only with predict(features=True)

    def __len__(self) -> int:
        return len(self.class_ids)


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
    file. ``backend``: ``auto`` (the fastest that can run ``path`` here), ``torch``, ``onnxruntime``,
    ``opencv`` or ``tensorrt``. ``device``: ``None`` (CUDA when the backend can use it), ``"cpu"``,
    ``"cuda"`` (``"cuda:N"`` for torch). ``channel_order``: ``"rgb"`` or ``"bgr"`` (OpenCV's frames are
    BGR: without it they are misread, silently). ``fit``: how frames meet the model's aspect ratio,
    ``"resize"`` (stretch) or ``"center-crop"`` (see :func:`edgehebb.deploy.frames.frames_to_tensor`).
    ``upscale``: accept frames smaller than the model's input (stretched up); refused by default.
    ``max_chunk``: the most frames one backend call gets (``None``: the backend's measured best on the
    CPU, fewer for a model with larger cosine maps than fig2_left's; 256 on CUDA); :meth:`predict` splits larger batches. ``threads``: see the module doc.

    Steady-state inference allocates no new input buffers: each backend keeps one input buffer per
    frame shape (torch: a pinned host copy and a device copy on CUDA; ONNX Runtime: an IOBinding
    whose input lives on the GPU with CUDA), for the last few shapes seen. Memory above the loaded
    model grows with ``max_chunk``, by ~3 MB per 32 x 32 frame for fig2_left.

    Thread safety: those buffers are shared state, so :meth:`predict` holds a per-instance lock;
    sharing one Runtime between threads is safe but runs their calls one at a time. For parallel
    inference use one Runtime per thread (each has its own buffers; on CUDA they share the GPU).
    :meth:`prepare` / :meth:`forward` (for benchmarks) take no lock: call them from one thread.
    """

    def __init__(self, path, backend: str = "auto", device: str | None = None, *,
                 channel_order: str = "rgb", fit: str = "resize", max_chunk: int | None = None,
                 upscale: bool = False, threads: int | None = None):
        if backend not in BACKENDS:
            raise EdgehebbError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        check_choice(channel_order, CHANNEL_ORDERS, "channel order")
        check_choice(fit, FITS, "fit")
        for name, value in (("max_chunk", max_chunk), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EdgehebbError(f"{name} must be an integer >= 1, got {value!r}")
        kind, target = resolve_target(path)
        if backend == "auto":
            backend, self.why = choose(kind, device)
        else:
            self.why = "asked for"
        reason = mismatch(backend, kind)
        if reason is not None:
            raise EdgehebbError(f"{target}: {reason}")
        self.path, self.backend, self.channel_order, self.fit = target, backend, channel_order, fit
        self.upscale, self.threads = bool(upscale), threads
        self.device = _resolve_device(backend, device)
        self._lock = threading.Lock()
        self._tmp: Path | None = None
        make = BACKEND_CLASSES[backend]
        try:
            if backend in ("onnxruntime", "opencv") and kind == "model":
                target = self._export(target, channel_order, fit)
            try:
                self._backend = make(target, self.device, channel_order, fit, threads=threads)
            except NoCudaProvider as e:
                if device not in (None, "auto"):  # asked for CUDA: say why it cannot have it
                    raise
                warnings.warn(f"{e}; running on the CPU", stacklevel=2)
                self.device = "cpu"
                self._backend = make(target, self.device, channel_order, fit, threads=threads)
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
        self.max_chunk: int = max_chunk or (CUDA_MAX_CHUNK if self.device.startswith("cuda")
                                            else self._backend.cpu_batch())

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
        """Class ids, probabilities and names (and, with ``features``, pooled features) of 1 or N frames, or of
        a list of frames (in its order).

        More than ``max_chunk`` frames (or than a TensorRT profile's largest batch) run as several
        backend calls of equal size: see the module doc.
        """
        groups = group_frames(frames)
        for _, batch in groups:
            self._check_size(batch)
        most = min(self.max_chunk, self.max_batch or self.max_chunk)
        n = sum(len(idx) for idx, _ in groups)
        # results go straight into arrays made once: small per-chunk arrays kept alive between the chunks'
        # large transient ones fragment the heap (1,024 frames in chunks of 4 grew it by 240 MiB)
        probs = np.empty((n, len(self.classes)), np.float32)
        feats = None
        with self._lock, self._threads():
            backend = self._open()
            for idx, batch in groups:
                for lo, hi in chunks(len(batch), most):
                    p, f = self._run(backend, batch[lo:hi], features)
                    probs[idx[lo:hi]] = p
                    if features:
                        if feats is None:
                            feats = np.empty((n, f.shape[1]), np.float32)
                        feats[idx[lo:hi]] = f
        ids = probs.argmax(1).astype(np.int64)
        return Prediction(ids, probs, [self.classes[i] for i in ids], feats)

    def _check_size(self, batch) -> None:
        """Frames the model would stretch up are refused unless ``upscale``; a baked-in file checks its own size."""
        if not self.upscale and self.frame_size is None:
            check_not_upscaled(tuple(batch.shape), self.input_size, self.fit)

    def _threads(self):
        """``threads`` for the length of a call (torch's and OpenCV's counts are process-wide)."""
        return self._open().threads_scope(self.threads) if self.threads is not None else contextlib.nullcontext()

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
        frames = check_frames(frames)
        self._check_size(frames)
        with self._threads():
            return self._open().prepare(frames)

    def forward(self, prepared):
        """For benchmarks: run the model on :meth:`prepare` output; outputs stay on the device (not synchronised)."""
        with self._threads():
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
        threads = "" if self.threads is None else f", threads={self.threads}"
        return (f"Runtime({str(self.path)!r}, backend={self.backend!r}, device={self.device!r}, "
                f"max_chunk={self.max_chunk}{threads})  # backend: {self.why}")
