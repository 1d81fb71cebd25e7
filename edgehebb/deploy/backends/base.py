"""What every inference backend of :class:`edgehebb.Runtime` is: one interface, as Polygraphy's runners have.

A backend loads one model file and runs batches of uint8 NHWC frames through four steps, which the
Runtime calls in order and a benchmark can time apart:

- :meth:`Backend.prepare`: frames -> the model's input, where the model runs (reused buffers);
- :meth:`Backend.forward`: input -> outputs, left where they were computed (not synchronised);
- :meth:`Backend.fetch`: outputs -> host numpy arrays (probabilities, and features if asked), copied;
- :meth:`Backend.synchronize` / :meth:`Backend.close`.

Subclasses say what they are as class attributes: ``name``, the ``targets`` they run (``model``: a
model directory; ``onnx``; ``engine``: a TensorRT engine), the ``devices`` they run on, and
:meth:`unavailable`, why they cannot run here (a missing package, no GPU) or None.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from edgehebb.errors import EdgehebbError

# fig2_left's cosine map per frame (400 filters x 29 x 29 positions, 1.3 MB of float32), on which
# every backend's cpu_chunk was measured
CHUNK_REFERENCE_MAP = 400 * 29 * 29

_CACHED_SHAPES = 4   # input buffers kept per Runtime: a stream has one shape, a bench a few


class LruCache(OrderedDict):
    """At most ``_CACHED_SHAPES`` entries, so a stream of changing frame sizes cannot pile up buffers."""

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = make()
            while len(self) > _CACHED_SHAPES:
                self.popitem(last=False)
        return self[key]


class Staging:
    """uint8 frames copied into a reusable buffer per shape on ``device`` (via a pinned host copy on CUDA).

    Frames already on a GPU are used in place when they are on ``device``.
    """

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:   # "cuda" -> "cuda:N", to compare with a tensor's device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self._buffers = device, LruCache()

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


def to_host(value) -> np.ndarray:
    """A backend output (torch tensor, ONNX Runtime OrtValue, numpy array) as a float32 numpy array of the
    caller's own: a copy, never a view of memory the next run may overwrite."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy().copy()   # .cpu() synchronises a CUDA stream
    if not isinstance(value, np.ndarray) and hasattr(value, "numpy"):   # OrtValue
        value = value.numpy()
    return np.array(value, dtype=np.float32, copy=True)


class Backend(ABC):
    """The interface; see the module doc. Set by ``__init__``: ``classes``, ``input_size`` (H, W),
    ``frame_size`` ((H, W) of the only frames a baked-in file takes, else None), ``device``."""

    name: str = ""
    targets: tuple[str, ...] = ()        # "model", "onnx", "engine"
    devices: tuple[str, ...] = ("cpu",)  # "cpu" and/or "cuda"
    min_batch: int = 1
    max_batch: int | None = None         # a TensorRT profile's limit; None: any
    frame_size: tuple[int, int] | None = None
    # Frames per call on the CPU that ran fastest per frame for fig2_left (tools/bench_runtime.py,
    # BENCHMARKS.md): Runtime(max_chunk=None) splits batches into chunks of at most cpu_batch()
    cpu_chunk: int = 64
    # the model's cosine-map floats per frame (edgehebb.nnl.spec.map_floats), where its spec is known
    map_floats: int | None = None

    classes: list[str]
    input_size: tuple[int, int]

    def cpu_batch(self) -> int:
        """Frames per call on the CPU: ``cpu_chunk``, cut in proportion for a model whose cosine maps are
        larger than fig2_left's, on which it was measured, so that one call's maps still fit the cache
        (fig2_left_wide, four times the map: chunk 1 ran 21 % faster per frame than 2 at batch 64 through
        ONNX Runtime, and 16 % than 4 through torch; RESULTS.md, issue 24). Never raised above it."""
        if not self.map_floats:
            return self.cpu_chunk
        return max(1, min(self.cpu_chunk, self.cpu_chunk * CHUNK_REFERENCE_MAP // self.map_floats))

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        """Why this backend cannot run on ``device`` here (what to install, no GPU), or None."""
        return None

    @abstractmethod
    def prepare(self, frames):
        """uint8 (N, H, W, 3) frames (numpy or torch) -> the model's input where it runs, in reused buffers."""

    @abstractmethod
    def forward(self, prepared) -> dict:
        """``{"logits", "probabilities", "features"}`` of :meth:`prepare` output, left on the device."""

    def fetch(self, out: dict, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, features or None) as host arrays of the caller's own."""
        if features and "features" not in out:
            raise EdgehebbError(f"this {self.name} model has no 'features' output; re-export it with `edgehebb export`")
        return to_host(out["probabilities"]), (to_host(out["features"]) if features else None)

    def synchronize(self) -> None:
        """Wait for queued device work; the CPU backends return finished results, so nothing to wait for."""

    def threads_scope(self, threads: int):
        """A context in which this backend computes on ``threads`` threads: process-wide settings (torch's,
        OpenCV's) are set on entry and restored on exit; a backend with a per-session count (ONNX Runtime)
        has set it when it was built and needs nothing here."""
        return contextlib.nullcontext()

    def close(self) -> None:
        staging = getattr(self, "_staging", None)
        if staging is not None:
            staging.clear()


def target_kind(path: Path) -> str:
    """``model``, ``onnx`` or ``engine`` for a resolved target path (see :func:`edgehebb.deploy.runtime.resolve_target`)."""
    if path.is_dir():
        return "model"
    return "onnx" if path.suffix.lower() == ".onnx" else "engine"
