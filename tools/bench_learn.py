#!/usr/bin/env python3
"""Benchmark the learning backends side by side: patches per second of the rank-update rule.

For each patch width W and minibatch size B it times the torch backend on the CPU, the torch backend
on CUDA and the PyCUDA kernel (each only where present; an absent one gives a JSON line with the
reason) through the same ``run(order, eps)`` call the trainer makes, after a warm-up, on random
CIFAR-sized uint8 images. Results are JSON lines on stdout (and appended to --out).

Per line: wall-clock patches/s of ``run`` (host work and transfers included; every backend returns
after a device sync), for pycuda also the GPU time of the launches alone (CUDA events), the arithmetic
rate of the currents (2*K*N flops per patch) and its fraction of the FP32 peak
(SMs x 128 lanes x 2 x clock).

--full-data PATH also learns the fig. 2-left filter bank from a real image set (K=400, W=4 and the
LearnConfig defaults unless overridden) through ``edgehebb.learn.loop.learn`` with each GPU backend, and
reports epoch times, GPU kernel time and how close the two filter banks are.

--quiet-vs-loaded times one epoch of the CPU backend (through ``edgehebb.learn.loop.learn``, with its thread
policy, and with the thread count fixed at 1 and at all cores) and of the anchor, the rule written the
obvious dense way in torch (unfold every patch, then per minibatch: gather rows, centre and scale,
matmul, topk, a dense g, the update; the unfold is timed), first on the machine as it is, then with
--busy background processes spinning (python/numpy loops the tool starts and stops), side by side.
Both run with the allocator setting of the CPU backend (edgehebb.allocator.keep_freed_memory). The
lines give patches/s, the 1-minute load average before each run and, for the CPU backend, the thread
counts used; the last line has the ratios the targets are about (loaded / quiet >= 1/3, quiet
CPU backend / quiet anchor >= 1).

Examples:
  python tools/bench_learn.py --seconds 1
  python tools/bench_learn.py --no-sweep --quiet-vs-loaded --out notes/quiet-vs-loaded.jsonl
  python tools/bench_learn.py --backends pycuda torch-cuda --batches 1000 10000 --out notes/bench.jsonl
  python tools/bench_learn.py --no-sweep --full-data $EDGEHEBB_DATA --save-weights /tmp/banks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgehebb.learn.hebbian import init_weights  # noqa: E402
from edgehebb.learn.loop import LearnConfig  # noqa: E402
from edgehebb.learn.patches import patch_grid  # noqa: E402

BACKENDS = ("torch-cpu", "torch-cuda", "pycuda")
FP32_LANES_PER_SM = 128  # Volta .. Hopper


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def why_absent(backend: str) -> str | None:
    if backend == "torch-cpu":
        return None
    if backend == "torch-cuda":
        return None if torch.cuda.is_available() else "torch has no CUDA device here"
    from edgehebb.learn import pycuda_backend as learn_pycuda

    try:
        import pycuda  # noqa: F401
    except ImportError:
        return "pycuda is not installed"
    return None if learn_pycuda.available() else "pycuda found no CUDA GPU (or no nvcc)"


def device_info() -> dict:
    """Name, multiprocessors and FP32 peak of GPU 0, through pycuda if present, else torch."""
    info = _pycuda_device_info()
    if info is not None:
        return info
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return dict(device=p.name, sms=p.multi_processor_count, clock_mhz=None, fp32_peak_tflops=None)
    return dict(device=None)


def _pycuda_device_info() -> dict | None:
    """The clock needed for the FP32 peak is only exposed by the driver API; None without pycuda or a GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    try:
        cuda.init()
        dev = cuda.Device(0)
    except cuda.Error:
        return None
    a = cuda.device_attribute
    sms, khz = dev.get_attribute(a.MULTIPROCESSOR_COUNT), dev.get_attribute(a.CLOCK_RATE)
    return dict(device=dev.name(), sms=sms, clock_mhz=khz / 1e3,
                fp32_peak_tflops=sms * FP32_LANES_PER_SM * 2 * khz * 1e3 / 1e12)


def make(backend: str, images: np.ndarray, cfg: LearnConfig, **kw):
    M = init_weights(cfg.filters, images.shape[3] * cfg.kernel ** 2, cfg.seed)
    if backend == "pycuda":
        from edgehebb.learn.pycuda_backend import PycudaLearner

        return PycudaLearner(images, cfg, M, **kw)
    from edgehebb.learn.torch_backend import TorchLearner

    return TorchLearner(images, cfg, M, device="cuda" if backend == "torch-cuda" else "cpu")


def measure(runner, n_patches: int, batch: int, seconds: float, max_steps: int) -> dict:
    """Warm up, size a call to about a quarter of the budget, then repeat it until the budget is spent."""
    gen = torch.Generator().manual_seed(0)

    def order(steps: int) -> torch.Tensor:
        return torch.randint(0, n_patches, (steps * batch,), generator=gen)

    runner.run(order(2), 0.01)  # compile, caches, first launch
    t0 = time.perf_counter()
    runner.run(order(4), 0.01)
    per_step = (time.perf_counter() - t0) / 4
    steps = int(max(1, min(max_steps, seconds / 4 / max(per_step, 1e-9))))
    o = order(steps)
    done, gpu, t0 = 0, 0.0, time.perf_counter()
    while True:
        runner.run(o, 0.01)
        done += steps
        gpu += getattr(runner, "last_kernel_seconds", 0.0)
        wall = time.perf_counter() - t0
        if wall >= seconds:
            break
    rec = dict(steps=done, steps_per_call=steps, seconds=round(wall, 4),
               patches_per_s=done * batch / wall)
    if gpu:
        rec.update(gpu_seconds=round(gpu, 4), gpu_patches_per_s=done * batch / gpu,
                   us_per_step_gpu=gpu / done * 1e6)
    return rec


def sweep(args, info: dict) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 32, 32, args.channels), dtype=np.uint8)
    absent = {b: why_absent(b) for b in args.backends}
    for kernel in args.kernels:
        ny, nx = patch_grid(32, 32, kernel, 1)
        n_patches = args.images * ny * nx
        dim = args.channels * kernel ** 2
        flops_per_patch = 2 * args.filters * dim
        for batch in args.batches:
            cfg = LearnConfig(filters=args.filters, kernel=kernel, batch=batch)
            variants = [(b, None) for b in args.backends]
            if args.pycuda_tiles and "pycuda" in args.backends:
                variants += [("pycuda", t) for t in (4, 2, 1)]
            torch_cuda_rate = None
            for backend, tile in variants:
                rec = dict(backend=backend, device=info.get("device") if backend != "torch-cpu" else platform.processor() or "cpu",
                           K=args.filters, W=kernel, C=args.channels, N=dim, B=batch)
                if absent[backend]:
                    emit({**rec, "skipped": absent[backend]}, args.out)
                    continue
                try:
                    runner = make(backend, images, cfg, **({"tile": tile} if tile else {}))
                    seconds = args.seconds if backend != "torch-cpu" else min(args.seconds, args.cpu_seconds)
                    rec.update(measure(runner, n_patches, batch, seconds, args.max_steps))
                except Exception as e:  # a failed configuration is a result too
                    emit({**rec, "error": f"{type(e).__name__}: {e}"}, args.out)
                    continue
                if backend == "pycuda":
                    rec["kernel_info"] = runner.kernel_info
                    if tile:
                        rec["forced_tile"] = tile
                rate = rec.get("gpu_patches_per_s", rec["patches_per_s"])
                rec["gflops"] = rate * flops_per_patch / 1e9
                if backend != "torch-cpu" and info.get("fp32_peak_tflops"):
                    rec["fraction_fp32_peak"] = rec["gflops"] / 1e3 / info["fp32_peak_tflops"]
                if backend == "torch-cuda":
                    torch_cuda_rate = rec["patches_per_s"]
                if backend == "pycuda" and torch_cuda_rate:
                    rec["speedup_vs_torch_cuda"] = rec["patches_per_s"] / torch_cuda_rate
                emit(rec, args.out)
                del runner
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def barriers(args, info: dict) -> None:
    """GPU time of one grid-wide barrier of the kernel, for a few grid sizes."""
    if why_absent("pycuda"):
        return
    from edgehebb.learn.pycuda_backend import grid_barrier_seconds

    for blocks in sorted({1, 16, 50, info["sms"]}):
        emit(dict(kind="barrier", device=info["device"], blocks=blocks,
                  us_per_barrier=grid_barrier_seconds(blocks) * 1e6), args.out)


def trace(args, images: np.ndarray, cfg: LearnConfig, info: dict) -> None:
    """How far apart the pycuda and torch-cuda weights drift, step by step, on the real data, next to
    pycuda against itself started from M0 * (1 + 1e-7 noise): the rule's own sensitivity."""
    if why_absent("pycuda") or why_absent("torch-cuda"):
        return
    from edgehebb.learn.loop import epoch_order
    from edgehebb.learn.pycuda_backend import PycudaLearner
    from edgehebb.learn.torch_backend import TorchLearner

    ny, nx = patch_grid(images.shape[1], images.shape[2], cfg.kernel, cfg.stride)
    steps, B = args.trace_steps, cfg.batch
    order = epoch_order(len(images) * ny * nx, cfg.seed, 0)[: steps * B]
    M0 = init_weights(cfg.filters, images.shape[3] * cfg.kernel ** 2, cfg.seed)
    noise = torch.randn(M0.shape, generator=torch.Generator().manual_seed(1))
    runners = dict(pycuda=PycudaLearner(images, cfg, M0), torch=TorchLearner(images, cfg, M0, device="cuda"),
                   perturbed=PycudaLearner(images, cfg, M0 * (1 + 1e-7 * noise)))
    done, every = 0, max(1, steps // 10)
    while done < steps:
        n = min(every, steps - done)
        for r in runners.values():
            r.run(order[done * B:(done + n) * B], cfg.lr)
        done += n
        w = {k: r.weights() for k, r in runners.items()}
        rec = dict(kind="trace", step=done, B=B)
        for other in ("torch", "perturbed"):
            d = w["pycuda"] - w[other]
            rec[f"vs_{other}_max_abs"] = float(d.abs().max())
            rec[f"vs_{other}_rel_frobenius"] = float(d.norm() / w[other].norm())
        emit(rec, args.out)


def compare(na: str, a: torch.Tensor, nb: str, b: torch.Tensor, out) -> None:
    d = (a - b).abs()
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    emit(dict(kind="full-data-compare", a=na, b=nb, max_abs_diff=float(d.max()),
              rel_frobenius=float(d.norm() / b.norm()), same_row_cosine_min=float((an * bn).sum(1).min()),
              best_match_cosine_mean=float((an @ bn.T).max(1).values.mean())), out)


def full_data(args, info: dict) -> None:
    import edgehebb.learn.loop as L
    from edgehebb.data import load_split

    data = load_split(args.full_data, "train", progress=False)
    images = np.ascontiguousarray(data.x)
    cfg = LearnConfig(filters=args.filters, kernel=4, **({"epochs": args.epochs} if args.epochs else {}),
                      **({"batch": args.full_batch} if args.full_batch else {}))
    banks = {}
    for backend in args.full_backends:
        reason = why_absent(backend)
        rec = dict(kind="full-data", backend=backend, device=info.get("device") if backend != "torch-cpu" else "cpu",
                   source=data.source, images=len(images), **dataclasses.asdict(cfg))
        if reason:
            emit({**rec, "skipped": reason}, args.out)
            continue
        captured = {}
        original = L.make_backend

        def spy(*a, **k):
            captured["runner"] = original(*a, **k)
            return captured["runner"]

        L.make_backend = spy
        try:
            t0 = time.perf_counter()
            state = L.learn(images, cfg, backend="pycuda" if backend == "pycuda" else "torch",
                            device="cuda" if backend == "torch-cuda" else "cpu", progress=False)
            wall = time.perf_counter() - t0
        finally:
            L.make_backend = original
        ny, nx = patch_grid(images.shape[1], images.shape[2], cfg.kernel, cfg.stride)
        patches = (len(images) * ny * nx // cfg.batch) * cfg.batch * cfg.epochs
        rec.update(patches=patches, wall_s=round(wall, 3), epoch_s=[round(h.seconds, 3) for h in state.history],
                   patches_per_s=patches / sum(h.seconds for h in state.history),
                   norm_error=[round(h.norm_error, 5) for h in state.history],
                   dead_fraction=[round(h.dead_fraction, 4) for h in state.history])
        runner = captured.get("runner")
        if getattr(runner, "kernel_seconds", 0.0):
            rec["gpu_kernel_s"] = round(runner.kernel_seconds, 3)
            rec["kernel_info"] = runner.kernel_info
        banks[backend] = state.weights
        if args.save_weights:
            Path(args.save_weights).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_weights) / f"filters-{backend}.npy", state.weights.numpy())
        emit(rec, args.out)
    if len(banks) >= 2:
        (na, a), (nb, b) = list(banks.items())[:2]
        compare(na, a, nb, b, args.out)
    if args.trace_steps:
        trace(args, images, cfg, info)
    if "pycuda" in banks and args.trace_steps:
        # the whole run again from a perturbed start: how much of the difference the rule makes itself
        M0 = init_weights(cfg.filters, images.shape[3] * cfg.kernel ** 2, cfg.seed)
        noise = torch.randn(M0.shape, generator=torch.Generator().manual_seed(1))
        state = L.learn(images, cfg, backend="pycuda", progress=False,
                        state=L.LearnState(weights=M0 * (1 + 1e-7 * noise)))
        compare("pycuda", banks["pycuda"], "pycuda-perturbed-1e-7", state.weights, args.out)
        if args.save_weights:
            np.save(Path(args.save_weights) / "filters-pycuda-perturbed.npy", state.weights.numpy())


# One busy loop per background process: numpy sums over an L2-sized array, the mix of interpreter and
# memory work that other people's experiments put on a shared machine.
BUSY = "import numpy as np\na = np.random.rand(1 << 16)\nwhile True:\n    a.sum()\n"


def dense_anchor_epoch(images: np.ndarray, cfg: LearnConfig, order: torch.Tensor) -> float:
    """Seconds for one epoch of the rule as a torch user would first write it, patch extraction included."""
    import torch.nn.functional as F

    t0 = time.perf_counter()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    dim = x.shape[1] * cfg.kernel ** 2
    patches = F.unfold(x, cfg.kernel, stride=cfg.stride).transpose(1, 2).reshape(-1, dim)   # (image, row, col) order
    M = init_weights(cfg.filters, dim, cfg.seed)
    rows = torch.arange(cfg.batch)
    for s in range(len(order) // cfg.batch):
        v = patches[order[s * cfg.batch:(s + 1) * cfg.batch]]
        v = v - v.mean(dim=1, keepdim=True)
        v = v / (v.norm(dim=1, keepdim=True) + 1e-8)
        h = v @ M.T
        top = h.topk(cfg.rank, dim=1).indices
        g = torch.zeros_like(h)
        g[rows, top[:, 0]] = 1.0
        g[rows, top[:, cfg.rank - 1]] = -cfg.delta
        ds = g.T @ v - (g * h).sum(dim=0)[:, None] * M
        M += cfg.lr * ds / ds.abs().max().clamp_min(1e-30)
    return time.perf_counter() - t0


def quiet_vs_loaded(args) -> None:
    """The CPU backend and the dense anchor, one epoch each, quiet and then beside --busy spinning processes."""
    import edgehebb.learn.loop as L
    from edgehebb.allocator import keep_freed_memory
    from edgehebb.threads import cores

    keep_freed_memory()   # the backend sets it on first use; set first, the anchor runs with it too
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.load_images, 32, 32, 3), dtype=np.uint8)
    cfg = LearnConfig(filters=args.filters, kernel=4, batch=1000)
    ny, nx = patch_grid(32, 32, cfg.kernel, cfg.stride)
    steps = args.load_images * ny * nx // cfg.batch
    order = L.epoch_order(args.load_images * ny * nx, cfg.seed, 0)[: steps * cfg.batch]
    n = cores()
    variants = [("torch-cpu", None), ("torch-cpu", 1), ("torch-cpu", n), ("dense-anchor", None), ("dense-anchor", 1)]
    default_threads = torch.get_num_threads()
    rates: dict[tuple, float] = {}

    def one(kind: str, threads: int | None, condition: str) -> None:
        rec = dict(kind="quiet-vs-loaded", condition=condition, busy=args.busy if condition == "loaded" else 0,
                   backend=kind, threads="auto" if threads is None and kind == "torch-cpu" else threads or default_threads,
                   cores=n, K=cfg.filters, W=cfg.kernel, B=cfg.batch, images=args.load_images,
                   patches=steps * cfg.batch, loadavg_1m=os.getloadavg()[0])
        if kind == "torch-cpu":
            state = L.learn(images, cfg, backend="torch", device="cpu", threads=threads, progress=False)
            seconds = state.history[0].seconds
            rec["threads_used"] = state.threads["units_by_threads"]
        else:
            torch.set_num_threads(threads or default_threads)
            try:
                seconds = dense_anchor_epoch(images, cfg, order)
            finally:
                torch.set_num_threads(default_threads)
        rec.update(seconds=round(seconds, 3), patches_per_s=steps * cfg.batch / seconds)
        rates[(kind, threads, condition)] = rec["patches_per_s"]
        emit(rec, args.out)

    for kind, threads in variants:
        one(kind, threads, "quiet")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY], env=env) for _ in range(args.busy)]
    try:
        time.sleep(2.0)   # let them reach full speed
        for kind, threads in variants:
            one(kind, threads, "loaded")
    finally:
        for p in busy:
            p.terminate()
        for p in busy:
            p.wait()
    ours = rates[("torch-cpu", None, "quiet")]
    anchor = max(rates[("dense-anchor", t, "quiet")] for t in (None, 1))
    emit(dict(kind="quiet-vs-loaded-summary", loaded_over_quiet=rates[("torch-cpu", None, "loaded")] / ours,
              target_loaded_over_quiet=1 / 3, quiet_cpu_over_best_quiet_anchor=ours / anchor,
              target_quiet_cpu_over_anchor=1.0), args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--filters", type=int, default=400, help="K (default 400)")
    p.add_argument("--kernels", type=int, nargs="+", default=[4, 8], help="patch widths W (default 4 8)")
    p.add_argument("--channels", type=int, default=3, help="C (default 3)")
    p.add_argument("--batches", type=int, nargs="+", default=[100, 1000, 10000, 100000], help="minibatch sizes B")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--images", type=int, default=2000, help="random 32x32 images to sample from (default 2000)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per configuration (default 2)")
    p.add_argument("--cpu-seconds", type=float, default=2.0, help="cap of the budget for torch-cpu (default 2)")
    p.add_argument("--max-steps", type=int, default=256, help="most minibatch steps per run() call (default 256, as the trainer)")
    p.add_argument("--pycuda-tiles", action="store_true", help="also time pycuda with each tile shape forced")
    p.add_argument("--no-sweep", action="store_true", help="skip the random-image sweep")
    p.add_argument("--full-data", metavar="PATH", help="also learn from the train split at PATH (edgehebb.data.load_split)")
    p.add_argument("--full-backends", nargs="+", choices=BACKENDS, default=["pycuda", "torch-cuda"])
    p.add_argument("--epochs", type=int, help="epochs of the full-data run (default: LearnConfig's)")
    p.add_argument("--full-batch", type=int, help="minibatch of the full-data run (default: LearnConfig's)")
    p.add_argument("--save-weights", metavar="DIR", help="write the full-data filter banks as .npy here")
    p.add_argument("--trace-steps", type=int, default=0,
                   help="with --full-data: follow pycuda vs torch-cuda (and pycuda vs a 1e-7-perturbed start) "
                        "over this many steps, and rerun the whole pycuda run from the perturbed start")
    p.add_argument("--quiet-vs-loaded", action="store_true",
                   help="time one CPU epoch of the backend and of the dense anchor, quiet and beside --busy processes")
    p.add_argument("--busy", type=int, default=2, help="background busy processes for --quiet-vs-loaded (default 2)")
    p.add_argument("--load-images", type=int, default=1000,
                   help="random 32x32 images of the --quiet-vs-loaded epoch (default 1000: 841,000 patches)")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    info = device_info()
    emit(dict(kind="env", torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
              **info), args.out)
    if not args.no_sweep:
        barriers(args, info)
        sweep(args, info)
    if args.full_data:
        full_data(args, info)
    if args.quiet_vs_loaded:
        quiet_vs_loaded(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
