#!/usr/bin/env python3
"""Many simulated cameras against a Triton server, and the same cameras against ``Runtime`` in-process (issue 21).

Each camera is a thread that sends one uint8 frame per request at a target rate (``--fps``) for a bounded
time (``--seconds``), over HTTP or gRPC (tritonclient), and waits for each answer before the next frame
(one request in flight per camera, as a camera pipeline with one inference slot). A frame whose time
came while the previous one was still in flight is dropped, as a camera with a full queue drops it, so
the offered load never exceeds the target. Per run it reports:

- throughput: answered frames per second of the run;
- latency of the answered frames (send to answer): mean, p50, p95, p99, max in ms;
- late: answers that came after the camera's next frame was due (over one frame interval);
  dropped: frames never sent because the camera was still waiting; failed: requests that raised;
- batches: the batch sizes the server formed during the run (its statistics, before and after).

The in-process baseline (``runtime``) runs the same cameras, frames and schedule through
``edgehebb.Runtime`` on the repository's own ONNX file, one Runtime per camera thread (the README's
advice for parallel use: ``per-camera``) and/or one Runtime shared by all cameras, its calls serialised
by its lock (``shared``); ``--runtime-modes`` picks them. Ratios
(server / runtime) are taken only between runs of this one invocation, on this machine.

With ``--repo`` the tool starts the server itself (``edgehebb.deploy.triton_server``) and stops it at
the end; with ``--http``/``--grpc`` it uses a running one (then ``--onnx`` names the file for the
baseline). JSON on stdout, progress on stderr, a PNG beside ``--out``.

  python tools/serve_bench.py --repo REPO --cameras 1,4,16 --fps 30 --seconds 10 --out results/serve/bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

REQUEST_TIMEOUT_S = 10.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentiles(latencies: list[float]) -> dict:
    import numpy as np

    if not latencies:
        return {k: None for k in ("mean", "p50", "p95", "p99", "max")}
    a = np.asarray(latencies) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def make_frames(n: int, size: tuple[int, int], seed: int = 0):
    """n distinct uint8 frames (smooth gradients plus noise, so they are not all one class)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        wave = np.sin(rng.uniform(2, 12) * (np.cos(a := rng.uniform(0, 3.1)) * xx + np.sin(a) * yy))
        img = 128 + 90 * wave[..., None] * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 12, (h, w, 3))
        out[i] = np.clip(img, 0, 255)
    return out


class Camera(threading.Thread):
    """One camera: frame k is due at start + k / fps; sends it if the previous answer is back, else drops it.

    Its client (or Runtime) is made and warmed up in its own thread (tritonclient's HTTP client is bound
    to the thread that made it), then every camera starts at one moment (``start``, set by the barrier).
    """

    def __init__(self, index: int, make_infer, frames, fps: float, seconds: float, barrier, start: list):
        super().__init__(daemon=True, name=f"camera-{index}")
        self.index, self.make_infer, self.frames, self.fps, self.seconds = index, make_infer, frames, fps, seconds
        self.barrier, self.start_box = barrier, start
        self.latencies: list[float] = []
        self.sent = self.late = self.dropped = self.failed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        self.infer, closer = self.make_infer(self.index)
        try:
            self.infer(self.frames[:1])   # warm-up: connection and first-call costs out of the timing
            self.barrier.wait(REQUEST_TIMEOUT_S * 3)
            self._loop()
        except threading.BrokenBarrierError:
            self.errors.append("the cameras did not all get ready in time")
        finally:
            if closer is not None:
                closer.close()

    def _loop(self) -> None:
        self.start_at = self.start_box[0]
        interval, end = 1.0 / self.fps, self.start_at + self.seconds
        for k in range(int(self.seconds * self.fps)):   # bounded in count and, below, in time
            due = self.start_at + k * interval
            now = time.monotonic()
            if now >= end:
                break
            if now > due + interval:   # still waiting for the last answer when this frame came: dropped
                self.dropped += 1
                continue
            if now < due:
                time.sleep(due - now)
            sent = time.monotonic()
            try:
                self.infer(self.frames[k % len(self.frames)][None])
            except Exception as e:   # counted and reported, the camera goes on
                self.failed += 1
                if len(self.errors) < 3:
                    self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            finally:
                self.sent += 1
            done = time.monotonic()
            self.latencies.append(done - sent)
            if done > due + interval:
                self.late += 1


def server_infer(protocol: str, url: str, model: str):
    """A function sending one request (one camera's own client) and returning the probabilities."""
    from edgehebb.errors import require

    module = require(f"tritonclient.{protocol}", package="tritonclient[http,grpc]", extra="serve",
                     why="serve_bench talks to Triton")
    if protocol == "http":
        client = module.InferenceServerClient(url, connection_timeout=REQUEST_TIMEOUT_S,
                                              network_timeout=REQUEST_TIMEOUT_S)
        timeout = {}
    else:
        client = module.InferenceServerClient(url)
        timeout = {"client_timeout": REQUEST_TIMEOUT_S}
    wanted = [module.InferRequestedOutput("probabilities")]

    def infer(frames):
        x = module.InferInput("frames", list(frames.shape), "UINT8")
        x.set_data_from_numpy(frames)
        return client.infer(model, [x], outputs=wanted, **timeout).as_numpy("probabilities")

    return infer, client


def server_stats(url: str, model: str) -> dict[int, int]:
    """{batch size: executions} so far, from the server's statistics (HTTP)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url, network_timeout=REQUEST_TIMEOUT_S)
    try:
        model_stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model_stats.get("batch_stats", [])}


def run_cameras(mode: str, n: int, args, frames, make_infer) -> dict:
    """One run: ``n`` cameras, each with the function ``make_infer(i)`` returns; the figures of the run."""
    start = [0.0]
    barrier = threading.Barrier(n, action=lambda: start.__setitem__(0, time.monotonic() + 0.1))
    cams = [Camera(i, make_infer, frames[i::n] if len(frames) >= n else frames, args.fps, args.seconds, barrier, start)
            for i in range(n)]
    for c in cams:
        c.start()
    deadline = time.monotonic() + 3 * REQUEST_TIMEOUT_S + args.seconds + REQUEST_TIMEOUT_S + 5
    for c in cams:
        c.join(max(deadline - time.monotonic(), 0))
    wall = max(time.monotonic() - start[0], 1e-9) if start[0] else float("nan")
    wall = min(wall, args.seconds + REQUEST_TIMEOUT_S)
    hung = sum(c.is_alive() for c in cams)
    latencies = [x for c in cams for x in c.latencies]
    return {"mode": mode, "cameras": n, "fps_target": args.fps, "seconds": args.seconds,
            "offered_fps": n * args.fps, "sent": sum(c.sent for c in cams), "answered": len(latencies),
            "throughput_fps": len(latencies) / wall, "latency_ms": percentiles(latencies),
            "late": sum(c.late for c in cams), "dropped": sum(c.dropped for c in cams),
            "failed": sum(c.failed for c in cams), "errors": [e for c in cams for e in c.errors][:3],
            "cameras_still_running": hung}


def machine() -> dict:
    cpu = ""   # unknown where there is no /proc/cpuinfo (not Linux) or it names no model
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    import numpy
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": list(os.getloadavg())}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgehebb.io import save_figure

    runs = result["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    counts = sorted({r["cameras"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        by = {r["cameras"]: r for r in runs if r["mode"] == mode}
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(counts))]
        axes[0].bar(xs, [by[c]["throughput_fps"] if c in by else 0 for c in counts], width, label=mode)
        axes[1].bar(xs, [(by[c]["latency_ms"]["p50"] or 0) if c in by else 0 for c in counts], width,
                    label=f"{mode} p50")
        axes[1].scatter(xs, [(by[c]["latency_ms"]["p99"] or 0) if c in by else 0 for c in counts], marker="_", s=200,
                        color="k")
    for ax, title in zip(axes[:2], ["answered frames/s", "latency ms (bar: p50, dash: p99)"]):
        ax.set_xticks(range(len(counts)), [f"{c} cam" for c in counts])
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].plot(range(len(counts)), [c * result["config"]["fps"] for c in counts], "k--", label="offered")
    axes[0].legend(fontsize=8)
    for r in runs:
        if r.get("batches"):
            sizes = sorted(r["batches"], key=int)
            axes[2].plot([int(s) for s in sizes], [r["batches"][s] for s in sizes], "o-",
                         label=f"{r['mode']}, {r['cameras']} cam")
    axes[2].set_title("server batches formed (executions per batch size)")
    axes[2].set_xlabel("batch size")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"serve_bench: {result['config']['fps']} fps per camera, {result['config']['seconds']} s per run, "
                 f"{result['machine']['cores']} cores shared by server and clients", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repo", type=Path, help="a python-backend repository: start a server over it for the run")
    p.add_argument("--http", help="a running server's HTTP endpoint, host:port")
    p.add_argument("--grpc", help="a running server's gRPC endpoint, host:port")
    p.add_argument("--model", help="model name [default: the repository's only model]")
    p.add_argument("--onnx", type=Path, help="ONNX file for the in-process baseline [default: REPO/MODEL/1/model.onnx]")
    p.add_argument("--cameras", default="1,4,16", help="camera counts, comma-separated [default: 1,4,16]")
    p.add_argument("--protocols", default="http,grpc", help="http, grpc or both [default: both]")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second per camera [default: 30]")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each run [default: 10]")
    p.add_argument("--frame-size", default="32x32", help="HxW of the frames sent [default: 32x32]")
    p.add_argument("--runtime-modes", default="per-camera,shared",
                   help="in-process baselines: per-camera (one Runtime each), shared (one for all), both, or none "
                        "[default: per-camera,shared]")
    p.add_argument("--out", type=Path, help="write the JSON here too, and the PNG beside it (same name, .png)")
    args = p.parse_args()
    if not (0 < args.fps <= 1000 and 0 < args.seconds <= 600):
        p.error("--fps must be in (0, 1000] and --seconds in (0, 600]")
    counts = [int(c) for c in args.cameras.split(",")]
    protocols = [x for x in args.protocols.split(",") if x]
    if not all(1 <= c <= 256 for c in counts) or not set(protocols) <= {"http", "grpc"}:
        p.error("--cameras takes counts from 1 to 256, --protocols http and/or grpc")
    runtime_modes = [] if args.runtime_modes == "none" else args.runtime_modes.split(",")
    if not set(runtime_modes) <= {"per-camera", "shared"}:
        p.error("--runtime-modes takes per-camera, shared, both (comma-separated) or none")
    h, w = (int(v) for v in args.frame_size.lower().split("x"))
    frames = make_frames(64, (h, w))

    server = None
    if args.repo is not None:
        from edgehebb.deploy.triton_server import TritonServer

        server = TritonServer(args.repo).start()
        urls = {"http": server.endpoints["http"], "grpc": server.endpoints["grpc"]}
        log(f"started {server!r}")
    else:
        urls = {"http": args.http, "grpc": args.grpc}
        if not urls["http"] or any(urls[x] is None for x in protocols):
            p.error("without --repo, give --http (for statistics) and the endpoint of each protocol measured")
    try:
        model = args.model or (sorted(server.models)[0] if server and len(server.models) == 1 else None)
        if model is None:
            p.error("--model is needed when the repository holds several models (or with --http/--grpc)")
        onnx = args.onnx or (args.repo / model / "1" / "model.onnx" if args.repo else None)
        result = {"machine": {**machine(), "server": server.describe()["server"] if server else None},
                  "config": {"model": model, "fps": args.fps, "seconds": args.seconds, "frame_size": [h, w],
                             "request_timeout_s": REQUEST_TIMEOUT_S, "runtime_modes": runtime_modes,
                             "outputs_requested": ["probabilities"]}, "runs": []}
        for n in counts:
            for protocol in protocols:
                before = server_stats(urls["http"], model)
                run = run_cameras(f"triton-{protocol}", n, args, frames,
                                  lambda i, pr=protocol: server_infer(pr, urls[pr], model))
                after = server_stats(urls["http"], model)
                run["batches"] = {str(s): after[s] - before.get(s, 0) for s in sorted(after)
                                  if after[s] - before.get(s, 0) > 0}
                result["runs"].append(run)
                log(f"{run['mode']:>13} {n:>3} cameras: {run['throughput_fps']:7.1f} frames/s, p50 "
                    f"{run['latency_ms']['p50']:.2f} ms, p99 {run['latency_ms']['p99']:.2f} ms, late {run['late']}, "
                    f"dropped {run['dropped']}, failed {run['failed']}, batches {run['batches']}")
            for mode in runtime_modes if onnx is not None else []:
                result["runs"].append(runtime_run(mode, n, args, frames, onnx))
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["ratios"] = ratios(result["runs"])
    finally:
        if server is not None:
            log(f"stopped the server: {server.stop()}")
    print(json.dumps(result, indent=1))
    if args.out is not None:
        from edgehebb.io import atomic_write_json

        atomic_write_json(args.out, result)
        plot(result, args.out.with_suffix(".png"))
        log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def runtime_run(mode: str, n: int, args, frames, onnx: Path) -> dict:
    from edgehebb import Runtime

    shared = Runtime(onnx, backend="onnxruntime", device="cpu") if mode == "shared" else None

    def make(_i):
        rt = shared or Runtime(onnx, backend="onnxruntime", device="cpu")
        return (lambda f: rt.predict(f).probabilities), (None if shared else rt)

    run = run_cameras(f"runtime-{mode}", n, args, frames, make)
    if shared is not None:
        shared.close()
    run["batches"] = {}
    log(f"{run['mode']:>13} {n:>3} cameras: {run['throughput_fps']:7.1f} frames/s, p50 "
        f"{run['latency_ms']['p50']:.2f} ms, p99 {run['latency_ms']['p99']:.2f} ms, late {run['late']}, "
        f"dropped {run['dropped']}, failed {run['failed']}")
    return run


def ratios(runs: list[dict]) -> list[dict]:
    """Server / in-process, per camera count, protocol and baseline: throughput, p50 and p99 latency."""
    out = []
    pairs = [(r, b) for r in runs for b in runs if r["mode"].startswith("triton") and b["mode"].startswith("runtime")
             and b["cameras"] == r["cameras"]]
    for r, base in pairs:
        if not base["answered"] or not r["answered"]:
            continue
        out.append({"cameras": r["cameras"], "mode": r["mode"], "baseline": base["mode"],
                    "throughput": r["throughput_fps"] / base["throughput_fps"],
                    "p50_latency": r["latency_ms"]["p50"] / base["latency_ms"]["p50"],
                    "p99_latency": r["latency_ms"]["p99"] / base["latency_ms"]["p99"]})
    return out


if __name__ == "__main__":
    main()
