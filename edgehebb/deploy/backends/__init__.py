"""The inference backends of :class:`edgehebb.Runtime`, one module each (Polygraphy's per-backend runners),
and the one place that decides which backend can run what.

Importing this package imports none of the optional engines (onnxruntime, cv2, tensorrt): each backend
imports its own when it is built.
"""

from __future__ import annotations

from edgehebb.deploy.backends.base import Backend
from edgehebb.deploy.backends.onnxruntime_backend import NoCudaProvider, OrtBackend
from edgehebb.deploy.backends.opencv_backend import OpenCVBackend
from edgehebb.deploy.backends.tensorrt_backend import TrtBackend
from edgehebb.deploy.backends.torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchBackend, OrtBackend, OpenCVBackend, TrtBackend)}
TARGET_WORDS = {"model": "a model directory", "onnx": "a .onnx file", "engine": "a TensorRT engine"}
# The CPU backends, fastest first per frame at batch 1, 8, 64 and 256, each at its cpu_chunk, one thread
# (tools/bench_runtime.py on fig2_left-cifar10, 2026-12-04; BENCHMARKS.md, "The runtime on the CPU"):
# ONNX Runtime 1.00-0.84x the bare product of the op's dot products, torch 1.27-0.87x, OpenCV 1.76-1.66x.
CPU_SPEED_ORDER = ("onnxruntime", "torch", "opencv")

__all__ = ["BACKENDS", "CPU_SPEED_ORDER", "Backend", "NoCudaProvider", "OpenCVBackend", "OrtBackend", "TorchBackend",
           "TrtBackend", "choose", "mismatch", "why_not"]


def mismatch(name: str, kind: str) -> str | None:
    """Why backend ``name`` cannot run a target of ``kind`` (``model``, ``onnx``, ``engine``), or None."""
    cls = BACKENDS[name]
    if kind in cls.targets:
        return None
    if name == "tensorrt":
        return "the tensorrt backend needs a .engine file (build one with `edgehebb export --trt`)"
    if kind == "engine":
        return f"{name} cannot run a TensorRT engine (use backend='tensorrt')"
    return f"the {name} backend needs {' or '.join(TARGET_WORDS[k] for k in cls.targets)}, not {TARGET_WORDS[kind]}"


def why_not(name: str, kind: str, device: str) -> str | None:
    """Why backend ``name`` cannot run a ``kind`` target on ``device`` here (the target, the device, or a
    missing package or GPU), or None when it can. ``edgehebb bench`` reports this as the skip reason."""
    cls = BACKENDS[name]
    reason = mismatch(name, kind)
    if reason is None and device.split(":")[0] not in cls.devices:
        reason = f"the {name} backend runs on {' or '.join(d.upper() for d in cls.devices)} only, not {device}"
    return reason or cls.unavailable(device)


def choose(kind: str, device: str | None) -> tuple[str, str]:
    """The backend ``Runtime(backend="auto")`` runs a ``kind`` target with, and why (for ``repr``)."""
    if kind == "engine":
        return "tensorrt", "a TensorRT engine runs on TensorRT"
    if kind == "onnx":
        return "onnxruntime", "an ONNX file runs on ONNX Runtime"
    cuda = device not in (None, "auto", "cpu") or (device in (None, "auto") and TorchBackend.unavailable("cuda") is None)
    if cuda:
        return "torch", "a model directory on a CUDA GPU runs on torch"
    for name in CPU_SPEED_ORDER:
        if why_not(name, kind, "cpu") is None:
            return name, (f"the fastest installed CPU backend for a model directory (fastest first: "
                          f"{', '.join(CPU_SPEED_ORDER)}; tools/bench_runtime.py)")
    raise AssertionError("torch is a dependency: it can always run a model directory")
