#!/usr/bin/env python3
"""GPU inference check (issue 5): parity and latency of torch (eager, torch.compile), ONNX Runtime
(CPU, CUDA EP with and without TF32) and the fused PyCUDA kernel (edgehebb.deploy.fused) for trained
models, side by side in one run, plus the network's roofline time.

Parity: logits of N test images from every path against torch on the CPU (float32), as the largest
|difference| relative to each row's largest |logit|, and top-1 agreement. Latency: device-resident
float input, warm-up then per-iteration wall time around the call with ``torch.cuda.synchronize()``
(the same clock for every path; ORT runs on its own stream), p50/p90/p99 per batch and images/s.
The fused kernel's launch shapes (filters per thread block, threads, patch values per shared tile)
are swept at the largest batch (features only, ``fused_shapes``); the tables use the default plan.
Roofline at each batch: max(FLOPs / FP32 peak, bytes / memory bandwidth) with the FLOPs of the
block convolutions (dot product and box sums) and head, and the bytes of input, filters and output.
Prints one JSON object; ``--out`` also writes it after every model, so a run cut short keeps what it
measured. A path that fails (ORT without a working CUDA provider, the fused kernel, torch.compile) is
recorded under ``errors`` and the others go on.

  python tools/gpu_inference_check.py models/fig2_left-cifar10 runs/paper/models/fig2_middle-local \\
      --data $EDGEHEBB_DATA --peak-tflops 66.9 --bandwidth-tbs 3.35
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgehebb.deploy.op import parity_error


def flops_per_image(spec) -> float:
    c, h, w = spec.input
    total = 0.0
    for b in spec.blocks:
        mh, mw = b.map_size(h, w)
        n = c * b.kernel ** 2
        total += 2.0 * mh * mw * n * (b.filters + 2)       # dot product + two box sums
    from edgehebb.nnl.spec import head_macs

    return total + 2.0 * head_macs(spec)


def percentiles(ms: list[float]) -> dict:
    q = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2])}


def time_fn(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def ort_cuda_runner(sess, x: torch.Tensor, classes: int):
    """IOBinding with device-resident input and logits; ORT allocates the other outputs on the device.
    The returned call holds ``x`` and the logits, whose memory ORT reads and writes."""
    x = x.contiguous()
    io = sess.io_binding()
    logits = torch.empty((x.shape[0], classes), device="cuda")
    io.bind_input("images", "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
    io.bind_output("logits", "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
    for name in ("probabilities", "features"):
        io.bind_output(name, "cuda")

    def run(bound=(x, logits)):   # keeps the bound tensors alive as long as the call
        sess.run_with_iobinding(io)
    return run, logits


def attempt(r: dict, key: str, fn):
    """``fn()``, or None with the error recorded under ``r["errors"][key]``: one path failing (a CUDA
    provider that did not load, a kernel that does not compile) must not lose the others."""
    try:
        return fn()
    except Exception as e:   # noqa: BLE001 - reported, not hidden
        r.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        print(f"{key}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def ort_cuda_session(path: Path, options: dict | None):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options or {})])
    if sess.get_providers()[0] != "CUDAExecutionProvider":   # ORT falls back to the CPU silently
        raise RuntimeError(f"the CUDA provider did not load (session providers {sess.get_providers()})")
    return sess


def sweep_fused(net, xs: torch.Tensor, batch: int, args) -> list[dict]:
    """p50 of the fused features (no head) at ``batch`` for a few launch shapes (kc, threads, nch)."""
    from edgehebb.deploy.fused import FusedNet

    x = (xs[:batch] if batch <= len(xs) else xs[:1].repeat(batch, 1, 1, 1)).cuda().contiguous()
    rows = []
    for kc, threads, nch in ((80, 160, None), (64, 128, None), (64, 256, None),
                             (128, 256, None), (96, 192, None), (80, 160, 24), (40, 160, None)):
        try:
            fused = FusedNet(net, kc=kc, threads=threads, nch=nch)
            ms = time_fn(lambda: fused.features(x), args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 - a shape that does not fit this device: report, keep sweeping
            rows.append({"kc": kc, "threads": threads, "nch": nch, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"kc": kc, "threads": threads, "nch": [p.define("NCH") for p in fused.plans],
                     **percentiles(ms)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=None)
    ap.add_argument("--images", type=int, default=2000, help="Test images for parity.")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--peak-tflops", type=float, default=66.9, help="FP32 (non-tensor-core) peak of the GPU.")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="Memory bandwidth of the GPU, TB/s.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the report here after every model.")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.nnl.model import load_model
    from edgehebb.nnl.spec import feature_dim
    from edgehebb.deploy.onnx_export import export_onnx

    from edgehebb import cuda_driver
    from edgehebb.deploy.fused import FusedNet

    with_fused = cuda_driver.available()  # pycuda, a GPU and nvcc

    test = load_split(resolve_data_root(args.data, download=False), "test", limit=args.images, progress=False)
    xs = (torch.from_numpy(np.array(test.x)).permute(0, 3, 1, 2).float() / 255).contiguous()   # NCHW, not channels_last
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "onnxruntime": ort.__version__,
              "providers": ort.get_available_providers(), "models": {}}
    tmp = Path(tempfile.mkdtemp())
    for name in args.models:
        net, config = load_model(name)
        onnx_path = export_onnx(name, tmp / f"{Path(name).name}.onnx")
        spec = net.spec
        r = {"features": feature_dim(spec), "flops_per_image": flops_per_image(spec), "parity": {}, "latency": {}}
        with torch.no_grad():
            ref = torch.cat([net(xs[i:i + 250]) for i in range(0, len(xs), 250)]).double()
            gpu_net = load_model(name, "cuda")[0]
            outs = {"torch-cuda": torch.cat([gpu_net(xs[i:i + 250].cuda()).cpu() for i in range(0, len(xs), 250)])}
        # use_tf32=0 is what edgehebb.Runtime sets; ORT's default (TF32 on) is kept beside it for comparison
        sessions = {"onnxruntime-cpu": ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])}
        for key, options in (("onnxruntime-cuda", {"use_tf32": "0"}), ("onnxruntime-cuda-tf32", None)):
            sess = attempt(r, key, lambda: ort_cuda_session(onnx_path, options))
            if sess is not None:
                sessions[key] = sess
        # the torch-side GPU paths that may fail; one that does is dropped from the timing below
        paths = {"torch-cuda": gpu_net, "torch-compile": torch.compile(gpu_net),
                 "pycuda-fused": attempt(r, "pycuda-fused", lambda: FusedNet(gpu_net)) if with_fused else None}

        def logits_of(model):
            with torch.no_grad():
                return torch.cat([model(xs[i:i + 250].cuda()).cpu() for i in range(0, len(xs), 250)])

        for key in ("torch-compile", "pycuda-fused"):
            out = attempt(r, key, lambda: logits_of(paths[key])) if paths[key] is not None else None
            if out is None:
                paths[key] = None
            else:
                outs[key] = out
        fused = paths["pycuda-fused"]
        for key, sess in sessions.items():
            r[f"{key}_providers"] = sess.get_providers()
            outs[key] = torch.from_numpy(np.concatenate([sess.run(["logits"], {"images": xs[i:i + 250].numpy()})[0]
                                                         for i in range(0, len(xs), 250)]))
        for key, out in outs.items():
            rel = parity_error(out, ref).max()   # OP_SPEC's metric, from the op's contract
            r["parity"][key] = {"max_rel_logit": float(rel),
                                "top1_agreement": float((out.argmax(1) == ref.argmax(1)).double().mean()),
                                "accuracy": float((out.argmax(1).numpy() == test.y).mean())}
        r["parity"]["torch-cpu"] = {"accuracy": float((ref.argmax(1).numpy() == test.y).mean())}
        for b in (int(s) for s in args.batches.split(",")):
            x = xs[:b].cuda() if b <= len(xs) else xs[:1].repeat(b, 1, 1, 1).cuda()
            row = {}
            for key, model in paths.items():
                warmup = args.warmup + 5 if key == "torch-compile" else args.warmup   # compiles on first calls
                if model is not None:
                    with torch.no_grad():
                        ms = attempt(r, f"{key}@{b}", lambda: time_fn(lambda: model(x), warmup, args.iters))
                    if ms is not None:
                        row[key] = ms
            for key in ("onnxruntime-cuda", "onnxruntime-cuda-tf32"):
                if key in sessions:
                    ms = attempt(r, f"{key}@{b}", lambda: time_fn(ort_cuda_runner(sessions[key], x, spec.classes)[0],
                                                                  args.warmup, args.iters))
                    if ms is not None:
                        row[key] = ms
            flop_s = r["flops_per_image"] * b / (args.peak_tflops * 1e12)
            nbytes = 4 * (b * np.prod(spec.input) + b * spec.classes
                          + sum(bl.filters * spec.input[0] * bl.kernel ** 2 for bl in spec.blocks))
            roof_ms = 1e3 * max(flop_s, nbytes / (args.bandwidth_tbs * 1e12))
            r["latency"][b] = {k: {**percentiles(v), "images_per_s": b / (statistics.median(v) / 1e3)}
                               for k, v in row.items()}
            best = min((v["p50_ms"] for v in r["latency"][b].values()), default=None)
            r["latency"][b]["roofline_ms"] = roof_ms
            r["latency"][b]["best_over_roofline"] = best / roof_ms if best is not None else None
            print(f"{name} batch {b}: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in r["latency"][b].items()
                                                     if isinstance(v, dict)) + f", roofline {roof_ms:.3f} ms",
                  file=sys.stderr, flush=True)
        if fused is not None:
            r["fused_plan"] = [dict(p.defines) for p in fused.plans]
            r["fused_shapes"] = sweep_fused(gpu_net, xs, max(int(v) for v in args.batches.split(",")), args)
        report["models"][name] = r
        print(json.dumps({"model": name, **r}), file=sys.stderr, flush=True)   # kept if a later model times out
        if args.out is not None:
            from edgehebb.io import atomic_write_json

            atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
