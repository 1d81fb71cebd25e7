"""Accuracy and latency of one model on every backend, through the same Runtime users call.

Per backend (``torch``, ``torch-cuda``, ``onnxruntime``, ``onnxruntime-cuda``, ``opencv``, ``tensorrt``):

- accuracy and error on the clean and the shadowed test images (:func:`edgehebb.camera.shadow.apply_shadow`:
  80% of each image times 0.3, seed 0 by default), per class, with :func:`accuracy_report`;
- latency per batch size, after a warm-up, over ``iters`` timed iterations, as p50/p90/p99/mean ms per
  batch and images/s at the median, two ways (trtexec reports the same split):

  * ``host``: :meth:`Runtime.predict` wall-clock time, uint8 frames in host memory to class ids and
    probabilities in host memory: frame checks, resize, host-to-device copy, model, device-to-host copy
    (a batch above the Runtime's ``max_chunk``, recorded per backend, runs as several calls, as it does
    for a user);
  * ``device``: the model alone on input already preprocessed and resident where the model runs
    (:meth:`Runtime.prepare` outside the loop, :meth:`Runtime.forward` timed, outputs left there; the
    whole batch in one call, not split by ``max_chunk``).
    torch on CUDA is timed with CUDA events around the launches; ONNX Runtime and TensorRT, which run
    on streams of their own and return synchronised, and the CPU backends by wall clock around a run
    (ONNX Runtime on CUDA with IOBinding, so no host copies; TensorRT's includes its runner's
    device-to-device copy of the input into the engine's binding). A model directory on ONNX Runtime
    or OpenCV is exported with the preprocessing in the graph, so there "device" includes it (a cast, a
    division, a transpose and a Resize, which is an exact copy for frames of the model's size).

A batch outside a TensorRT engine's profile is reported as skipped for that backend.

Frames. Every backend gets the test images as they are, except a model that takes frames of one
fixed size only (an export with ``--preprocess uint8-nhwc --frame-size HxW``, or an engine built
from one): it gets the test images resized to that size (:func:`camera_frames`), which is what a
camera would send it, and its entry and log line say so.

A backend that cannot run here (not installed, no GPU, wrong kind of model file, a GPU stack that
will not start) is reported as ``{"status": "skipped", "reason": ...}``, not as an error.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np
import torch

from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.evaluate.accuracy import accuracy_report, check_classes
from edgehebb.deploy.frames import frames_to_tensor
from edgehebb.deploy.backends import why_not
from edgehebb.deploy.runtime import Runtime, resolve_target
from edgehebb.camera.shadow import COVERAGE, INTENSITY, apply_shadow

# name -> (Runtime backend, device)
BACKENDS = {"torch": ("torch", "cpu"), "torch-cuda": ("torch", "cuda"), "onnxruntime": ("onnxruntime", "cpu"),
            "onnxruntime-cuda": ("onnxruntime", "cuda"), "opencv": ("opencv", "cpu"), "tensorrt": ("tensorrt", "cuda")}
BATCHES = (1, 32, 256)
ACCURACY_BATCH = 256   # frames per predict() for the accuracy pass, whatever batches are timed
_RESIZE_BATCH = 32     # images resized at a time for a fixed-frame model: 32 float frames of 480x640 are 118 MB
TIMING = {
    "host": "Runtime.predict wall clock: uint8 host frames -> host probabilities (checks, resize, "
            "host-to-device copy, model, device-to-host copy); batches above the backend's max_chunk run as "
            "several calls",
    "device": "model only, on preprocessed input already on the backend's device; outputs stay there; the whole "
              "batch in one call, whatever max_chunk. torch-cuda: CUDA events; the others: wall clock around a "
              "synchronised run (onnxruntime-cuda with IOBinding, no host copies; tensorrt including its "
              "device-to-device input copy). onnxruntime and opencv on a model directory: the exported graph takes "
              "uint8 frames, so their device time includes the preprocessing",
}


def why_skipped(name: str, kind: str) -> str | None:
    """Why bench backend ``name`` cannot run a ``kind`` ("model", "onnx", "engine") target here, or None
    (:func:`edgehebb.deploy.backends.why_not`, the Runtime's own rules)."""
    backend, device = BACKENDS[name]
    return why_not(backend, kind, device)


def summarise(times_ms: Sequence[float], batch: int) -> dict:
    t = np.asarray(times_ms, np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(t.mean()),
            "min_ms": float(t.min()), "images_per_s": float(batch / (p50 / 1e3)) if p50 > 0 else None}


def _enough(times: list[float], t_start: float, iters: int, seconds: float | None) -> bool:
    """A timing loop ends after ``iters`` calls, or after ``seconds`` once it has 3 (a bound, not a target)."""
    return len(times) >= iters or (seconds is not None and len(times) >= 3
                                   and time.perf_counter() - t_start >= seconds)


def time_host(rt: Runtime, frames: np.ndarray, warmup: int, iters: int, seconds: float | None = None) -> list[float]:
    """ms per predict() call (returns host arrays, so every call is complete when it returns)."""
    for _ in range(warmup):
        rt.predict(frames)
    times, t_start = [], time.perf_counter()
    while not _enough(times, t_start, iters, seconds):
        t0 = time.perf_counter()
        rt.predict(frames)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_device(rt: Runtime, frames: np.ndarray, warmup: int, iters: int, seconds: float | None = None) -> list[float]:
    """ms per forward() on device-resident input: CUDA events for torch on CUDA, else wall clock."""
    x = rt.prepare(frames)
    for _ in range(warmup):
        rt.forward(x)
    rt.synchronize()
    events = rt.backend == "torch" and rt.device.startswith("cuda")   # ORT and TensorRT use their own streams
    if events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times, t_start = [], time.perf_counter()
    while not _enough(times, t_start, iters, seconds):
        if events:
            start.record()
            rt.forward(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            rt.forward(x)
            rt.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def camera_frames(images: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 ``images`` (N, h, w, 3) as a camera of ``size`` (H, W) would send them: resized the way
    :func:`edgehebb.deploy.frames.frames_to_tensor` resizes (bilinear, half-pixel), rounded to uint8.
    Returned as they are when ``size`` is None or already theirs."""
    if size is None or tuple(images.shape[1:3]) == tuple(size):
        return images
    out = np.empty((len(images), *size, 3), np.uint8)
    for lo in range(0, len(images), _RESIZE_BATCH):
        x = frames_to_tensor(np.array(images[lo:lo + _RESIZE_BATCH]), size)   # a copy: images may be a read-only memmap
        out[lo:lo + len(x)] = (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def predict_all(rt: Runtime, images: np.ndarray, batch: int = ACCURACY_BATCH) -> np.ndarray:
    return np.concatenate([rt.predict(camera_frames(images[lo:lo + batch], rt.frame_size)).class_ids
                           for lo in range(0, len(images), batch)])


def bench_backend(rt: Runtime, test: ImageSet, shadowed: np.ndarray, batches: Sequence[int], warmup: int,
                  iters: int, seconds: float | None = None, progress: Callable[[str], None] = lambda line: None) -> dict:
    check_classes(rt.classes, test)
    size = rt.frame_size or test.x.shape[1:3]
    progress(f"{rt.backend} ({rt.device}): accuracy on {len(test)} clean and {len(test)} shadowed images")
    result = {"status": "ok", "backend": rt.backend, "device": rt.device, "providers": rt.providers,
              "max_chunk": rt.max_chunk, "threads": rt.threads,
              "frames": {"size": [int(v) for v in size], "resized": tuple(size) != tuple(test.x.shape[1:3])},
              "clean": accuracy_report(predict_all(rt, test.x), test.y, rt.classes),
              "shadowed": accuracy_report(predict_all(rt, shadowed), test.y, rt.classes), "latency": []}
    progress(f"{rt.backend}: clean {result['clean']['accuracy']:.2%}, shadowed {result['shadowed']['accuracy']:.2%}; "
             f"timing batches {', '.join(map(str, batches))}")
    for b in batches:
        if rt.max_batch is not None and b > rt.max_batch:
            result["latency"].append({"batch": b, "status": "skipped",
                                      "reason": f"above the engine's profile (max batch {rt.max_batch})"})
            continue
        if b < rt.min_batch:
            result["latency"].append({"batch": b, "status": "skipped",
                                      "reason": f"below the engine's profile (min batch {rt.min_batch})"})
            continue
        # the test images, repeated to fill b (resized for a fixed-frame model)
        frames = np.ascontiguousarray(camera_frames(test.x[np.arange(b) % len(test)], rt.frame_size))
        row = {"batch": b, "host": summarise(time_host(rt, frames, warmup, iters, seconds), b),
               "device": summarise(time_device(rt, frames, warmup, iters, seconds), b)}
        result["latency"].append(row)
        progress(f"{rt.backend}: batch {b}: p50 {row['host']['p50_ms']:.3g} ms per call host-to-host, "
            f"{row['device']['p50_ms']:.3g} ms device ({row['host']['images_per_s']:.0f} images/s)")
    return result


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def run_bench(model, test: ImageSet, *, backends: Sequence[str] = tuple(BACKENDS), batches: Sequence[int] = BATCHES,
              warmup: int = 10, iters: int = 50, seconds: float | None = 2.0, threads: int | None = None,
              intensity: float = INTENSITY, coverage: float = COVERAGE, seed: int = 0,
              log: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """The bench result (one JSON-ready dict) of ``model`` (directory, shipped name, .onnx or .engine).

    Each timing loop runs ``iters`` calls, or stops after ``seconds`` once it has 3 (None: no time bound);
    ``threads`` goes to every Runtime (None: each engine's own default). ``log`` gets one summary line per
    backend, ``progress`` a line at each step as it goes (what the CLI shows on stderr)."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise EdgehebbError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if not batches or min(batches) < 1 or iters < 1:
        raise EdgehebbError(f"batches must be >= 1 and iters >= 1 (got batches {list(batches)}, iters {iters})")
    if warmup < 0:
        raise EdgehebbError(f"warmup must be >= 0, got {warmup}")
    if len(test) == 0:
        raise EdgehebbError(f"no test images in {test.source}")
    kind, target = resolve_target(model)
    shadowed = apply_shadow(test.x, intensity, coverage, seed)
    result = {"model": str(model), "path": str(target), "kind": kind,
              "data": {"source": test.source, "images": len(test), "size": list(test.x.shape[1:3])},
              "shadow": {"intensity": intensity, "coverage": coverage, "seed": seed},
              "settings": {"batches": list(batches), "warmup": warmup, "iters": iters, "seconds": seconds,
                           "threads": threads, "accuracy_batch": ACCURACY_BATCH},
              "timing": TIMING, "machine": machine(), "backends": {}}
    for name in backends:
        reason = why_skipped(name, kind)
        entry = {"status": "skipped", "reason": reason}
        if reason is None:
            backend, device = BACKENDS[name]
            try:
                rt = Runtime(target, backend, device, threads=threads)
            except EdgehebbError as e:
                if device != "cuda":  # a CPU backend that cannot load the model: the model is at fault
                    raise
                entry["reason"] = str(e)  # installed, but its GPU stack cannot start on this machine
            else:
                with rt:
                    entry = bench_backend(rt, test, shadowed, batches, warmup, iters, seconds,
                                          progress=progress or (lambda line: None))
        result["backends"][name] = entry
        if log:
            log(describe(name, entry))
    return result


def describe(name: str, entry: dict) -> str:
    """One line per backend for the terminal."""
    if entry["status"] != "ok":
        return f"{name}: skipped ({entry['reason']})"
    lat = ", ".join(f"b{r['batch']} {r['device']['p50_ms']:.3g} ms ({r['host']['p50_ms']:.3g} host)"
                    if "device" in r else f"b{r['batch']} skipped" for r in entry["latency"])
    frames = entry.get("frames", {})
    fed = (f"; fed {frames['size'][0]}x{frames['size'][1]} frames (the test images resized: the model takes "
           f"that size only)" if frames.get("resized") else "")
    return (f"{name}: clean {entry['clean']['accuracy']:.2%}, shadowed {entry['shadowed']['accuracy']:.2%}; "
            f"p50 per batch {lat}{fed}")


def save_bench_png(result: dict, path: str | os.PathLike) -> None:
    """Left: p50 latency per batch (bars: device time; dots: host-to-host), log scale. Right: accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgehebb.io import save_figure

    ran = {n: e for n, e in result["backends"].items() if e["status"] == "ok"}
    batches = result["settings"]["batches"]
    fig, (lat_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    width = 0.8 / max(1, len(ran))
    for i, (name, e) in enumerate(ran.items()):
        xs = np.arange(len(batches)) + (i - (len(ran) - 1) / 2) * width
        timed = {r["batch"]: r for r in e["latency"] if "device" in r}   # NaN: a batch this backend skipped
        lat_ax.bar(xs, [timed[b]["device"]["p50_ms"] if b in timed else np.nan for b in batches], width,
                   label=name, color=f"C{i}")
        lat_ax.plot(xs, [timed[b]["host"]["p50_ms"] if b in timed else np.nan for b in batches], "o", color="k", ms=3)
    lat_ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    lat_ax.set_xlabel("batch size")
    lat_ax.set_ylabel("p50 latency per batch (ms, log)")
    lat_ax.set_yscale("log")
    lat_ax.set_title("latency: bars device-resident, dots host-to-host", fontsize=9)
    xs = np.arange(len(ran))
    acc_ax.bar(xs - 0.2, [100 * e["clean"]["accuracy"] for e in ran.values()], 0.4, label="clean")
    acc_ax.bar(xs + 0.2, [100 * e["shadowed"]["accuracy"] for e in ran.values()], 0.4, label="shadowed")
    acc_ax.set_xticks(xs, list(ran), rotation=20, fontsize=8)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_ylim(0, 100)
    sh = result["shadow"]
    acc_ax.set_title(f"accuracy: clean vs shadowed ({sh['coverage']:.0%} x {sh['intensity']})", fontsize=9)
    for ax in (lat_ax, acc_ax):
        ax.grid(alpha=0.3, axis="y")
        if ran:
            ax.legend(fontsize=7)
    skipped = [n for n, e in result["backends"].items() if e["status"] != "ok"]
    m = result["machine"]
    fig.suptitle(f"{result['model']} on {result['data']['images']} images of {result['data']['source']}\n"
                 f"{m.get('gpu', 'no GPU')}, {m['processor']} x{m['cpus']}"
                 + (f"; skipped: {', '.join(skipped)}" if skipped else ""), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
