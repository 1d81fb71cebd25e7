#!/usr/bin/env python3
"""The runtime on the CPU against its arithmetic ceiling: ms per frame through ``edgehebb.Runtime`` for every
CPU backend, chunk size and batch size, beside the bare matrix product of the op's dot products, side by
side in one run.

The ceiling is the op's dot products alone: a bare ``[841 * B, 48] x [48, 400]`` float32 ``torch.mm``
(fig2_left: 841 patch positions of 4 x 4 x 3 against 400 filters), at batch 1. Every configuration is
timed in interleaved rounds (one call of each per round, ``--rounds`` rounds), so a load that comes and
goes on a shared machine falls on all of them alike; each figure is the median over rounds of the best
of ``--reps`` calls. ``ratio`` is ms per frame over the bare product's ms per frame at batch 1.

With ``--chunks`` it sweeps ``max_chunk`` per backend (the default chunk of each backend, ``cpu_chunk``,
is the best of such a sweep), and ``--profile`` adds where the torch backend's time goes (torch's
profiler, self time per op, at its default chunk).

  OMP_NUM_THREADS=1 python tools/bench_runtime.py --threads 1 > runtime.json

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="fig2_left-cifar10", help="model directory or shipped name")
    ap.add_argument("--backends", default="torch,onnxruntime,opencv")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--chunks", default="", help="max_chunk values to sweep per backend, e.g. 1,2,4,8,16,64 "
                                                 "(default: each backend's own cpu_chunk only)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every backend and of the bare product")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="calls per round; the best counts")
    ap.add_argument("--profile", action="store_true", help="also break the torch backend's time down by op")
    args = ap.parse_args(argv)

    from edgehebb import Runtime
    from edgehebb.deploy.backends import BACKENDS, CPU_SPEED_ORDER, why_not

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    frames = {b: rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for b in batches}
    mm = {b: (torch.rand(841 * b, 48), torch.rand(48, 400)) for b in batches}

    configs = {}   # name -> (callable per batch)
    runtimes = []
    skipped = {}
    for name in args.backends.split(","):
        reason = why_not(name, "model", "cpu")
        if reason:
            skipped[name] = reason
            continue
        sweep = [int(c) for c in args.chunks.split(",")] if args.chunks else [BACKENDS[name].cpu_chunk]
        for chunk in sweep:
            rt = Runtime(args.model, backend=name, device="cpu", threads=args.threads, max_chunk=chunk)
            runtimes.append(rt)
            configs[(name, chunk)] = rt
    results = {key: {b: [] for b in batches} for key in configs}
    bare = {b: [] for b in batches}
    total = args.rounds * len(batches) * (len(configs) + 1)
    done, t_start = 0, time.perf_counter()
    for r in range(args.rounds):
        for b in batches:
            a, w = mm[b]
            bare[b].append(_best_of(lambda: torch.mm(a, w), args.reps) / b)
            done += 1
            for key, rt in configs.items():
                x = frames[b]
                rt.predict(x)   # warm: buffers of this shape
                results[key][b].append(_best_of(lambda: rt.predict(x), max(1, args.reps if b <= 64 else 1)) / b)
                done += 1
            _log(f"round {r + 1}/{args.rounds} batch {b}: {done}/{total} measurements, "
                 f"{time.perf_counter() - t_start:.0f} s")
    ceiling = float(np.median(bare[1])) if 1 in bare else float(np.median(bare[batches[0]]))
    out = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "reps": args.reps,
           "ceiling_ms_per_frame": ceiling * 1e3,
           "bare_matmul_ms_per_frame": {b: float(np.median(v)) * 1e3 for b, v in bare.items()},
           "cpu_speed_order": list(CPU_SPEED_ORDER), "skipped": skipped, "backends": []}
    for (name, chunk), per_batch in results.items():
        row = {"backend": name, "max_chunk": chunk, "default_chunk": chunk == BACKENDS[name].cpu_chunk,
               "ms_per_frame": {b: float(np.median(v)) * 1e3 for b, v in per_batch.items()}}
        row["ratio"] = {b: ms / (ceiling * 1e3) for b, ms in row["ms_per_frame"].items()}
        out["backends"].append(row)
    if args.profile and "torch" in {n for n, _ in configs}:
        out["torch_profile"] = _profile(args.model, args.threads, BACKENDS["torch"].cpu_chunk)
    if args.profile and "onnxruntime" in {n for n, _ in configs}:
        out["onnxruntime_profile"] = _ort_profile(args.model, args.threads, BACKENDS["onnxruntime"].cpu_chunk)
    for rt in runtimes:
        rt.close()
    print(json.dumps(out, indent=2))
    return 0


def _profile(model: str, threads: int, chunk: int) -> dict:
    """Self CPU time per op of the torch backend's predict on ``chunk`` frames, as shares of the total."""
    from edgehebb import Runtime

    x = np.random.default_rng(1).integers(0, 256, (chunk, 32, 32, 3), dtype=np.uint8)
    with Runtime(model, backend="torch", device="cpu", threads=threads, max_chunk=chunk) as rt:
        for _ in range(5):
            rt.predict(x)
        with torch.profiler.profile() as prof:
            for _ in range(30):
                rt.predict(x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return {"frames_per_call": chunk, "ops": [{"op": e.key, "share": e.self_cpu_time_total / total,
                                              "us_per_frame": e.self_cpu_time_total / 30 / chunk}
                                             for e in rows[:12]]}


def _ort_profile(model: str, threads: int, chunk: int) -> dict:
    """Time per ONNX op type of the exported model (uint8 frames baked in, as the Runtime runs it), from ONNX
    Runtime's own profiler, as shares of the total."""
    import os
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    from edgehebb.deploy.onnx_export import export_onnx

    x = np.random.default_rng(1).integers(0, 256, (chunk, 32, 32, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, os.path.join(tmp, "m.onnx"), preprocess="uint8-nhwc")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling, options.profile_file_prefix = True, os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(35):
            session.run(None, {"frames": x})
        trace = json.load(open(session.end_profiling()))
    per_op = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {"frames_per_call": chunk, "ops": [{"op": op, "share": us / total, "us_per_frame": us / 35 / chunk}
                                             for op, us in per_op.most_common(10)]}


if __name__ == "__main__":
    sys.exit(main())
