#!/usr/bin/env python3
"""Accuracy against inference cost for every model in the zoo, side by side in one run: what a camera
integrator chooses from.

For each model: test error on clean and on shadowed images (the paper's shadows, edgehebb.camera.shadow),
MFLOP per frame counted from its spec (the dot products of every block, the patch norms' box sums, a
whitening convolution where a block has one, the head), and ms per frame through ``edgehebb.Runtime`` on
this CPU, timed in interleaved rounds (median over rounds of the best of ``--reps`` calls) at batch 1 and
at ``--batch``. The paper's two points (fig. 2 left and middle) are drawn as references with their
published error and the MFLOP of our specs of those networks.

  OMP_NUM_THREADS=1 python tools/zoo_tradeoff.py --data $EDGEHEBB_DATA --threads 1 --out results/zoo/tradeoff.json

JSON on stdout (and in ``--out``, with a PNG beside it); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PAPER = {"fig2_left": 27.80, "fig2_middle": 23.0}   # published test error, % (PAPER.md)


def mflop(spec, normalised: bool = True) -> float:
    """Multiply-adds x 2 per frame, in MFLOP: every block's patch dot products (K filters of N = C*W*W),
    the |v|^2 box sum (N) unless ``normalised`` is False (the end-to-end CONV twin has no patch norm), a
    whitening convolution (N x N) where present, and the head (D x classes, or D x H + H x classes with a
    hidden layer of H units)."""
    c, h, w = spec.input
    total = 0.0
    for b in spec.blocks:
        mh, mw = b.map_size(h, w)
        n = c * b.kernel ** 2
        per_position = b.filters * n + (n if normalised else 0) + (n * n if getattr(b, "whiten", False) else 0)
        total += 2 * mh * mw * per_position
    from edgehebb.nnl.spec import head_macs

    total += 2 * head_macs(spec)
    return total / 1e6


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="model directories or shipped names [default: every shipped model]")
    ap.add_argument("--data", default=None, help="CIFAR-10 root [default: $EDGEHEBB_DATA]")
    ap.add_argument("--limit", type=int, default=None, help="class-balanced test images [default: all]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (a PNG beside it)")
    args = ap.parse_args(argv)

    from edgehebb import threads as thread_policy

    with thread_policy.configured(args.threads):   # and back after: main() is also called from Python
        return _run(args)


def _run(args) -> int:
    from edgehebb import Runtime
    from edgehebb.camera.shadow import apply_shadow
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.nnl.model import load_model, shipped_models
    from edgehebb.nnl.spec import load_spec, spec_from_dict

    names = args.models or shipped_models()
    test = load_split(resolve_data_root(args.data), "test", limit=args.limit, progress=False)
    shadowed = apply_shadow(test.x)   # the paper's shadows, as eval and bench draw them
    rows, runtimes = [], {}
    for name in names:
        _, config = load_model(name)
        spec = spec_from_dict(config["spec"], name)
        rt = Runtime(name, device="cpu", threads=args.threads)
        runtimes[name] = rt
        t0 = time.perf_counter()
        clean = float((rt.predict(test.x).class_ids == test.y).mean())
        shadow = float((rt.predict(shadowed).class_ids == test.y).mean())
        _log(f"{name}: clean {clean:.2%}, shadowed {shadow:.2%} on {len(test)} images ({time.perf_counter() - t0:.0f} s)")
        label = Path(name).name   # a model directory's name; a shipped name stays as it is
        rows.append({"model": label, "kind": config["kind"], "backend": rt.backend, "mflop_per_frame": mflop(spec, config["kind"] != "conv"),
                     "features": int(sum(b.filters * math.prod(b.out_size(*spec.input[1:])) for b in spec.blocks)),
                     "test_error_clean": 1 - clean, "test_error_shadowed": 1 - shadow, "images": len(test)})
    frames = {b: np.random.default_rng(0).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for b in (1, args.batch)}
    times = {(n, b): [] for n in names for b in frames}
    for r in range(args.rounds):
        for name in names:
            for b, x in frames.items():
                rt = runtimes[name]
                rt.predict(x)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    rt.predict(x)
                    best = min(best, time.perf_counter() - t0)
                times[(name, b)].append(best / b * 1e3)
        _log(f"timing round {r + 1}/{args.rounds}")
    for name, row in zip(names, rows):
        row["ms_per_frame"] = {str(b): float(np.median(times[(name, b)])) for b in frames}
    paper = [{"model": f"paper {k}", "mflop_per_frame": mflop(load_spec(k)), "test_error_clean": v / 100}
             for k, v in PAPER.items()]
    out = {"threads": args.threads, "data": {"source": test.source, "images": len(test)}, "models": rows,
           "paper": paper}
    for rt in runtimes.values():
        rt.close()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        _plot(out, args.out.with_suffix(".png"), args.batch)
    return 0


def _plot(out: dict, path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, label in ((axes[0], "mflop_per_frame", "MFLOP per frame"),
                           (axes[1], "ms_per_frame", f"ms per frame (Runtime, CPU, batch {batch})")):
        xs = [row[key] if key == "mflop_per_frame" else row[key][str(batch)] for row in out["models"]]
        for i, (row, x) in enumerate(zip(out["models"], xs)):
            # labels of models of about the same cost stack upwards instead of overlapping
            stacked = sum(1 for j in range(i) if abs(math.log(xs[j] / x)) < 0.15)
            ax.plot(x, 100 * row["test_error_clean"], "o", color=f"C{i}", label=f"{row['model']} clean")
            ax.plot(x, 100 * row["test_error_shadowed"], "x", color=f"C{i}", label=f"{row['model']} shadowed")
            ax.annotate(row["model"], (x, 100 * row["test_error_clean"]), fontsize=7,
                        xytext=(5, -10 + 11 * stacked), textcoords="offset points")
        if key == "mflop_per_frame":
            for p in out["paper"]:
                ax.plot(p[key], 100 * p["test_error_clean"], "*", color="k", ms=10)
                ax.annotate(p["model"], (p[key], 100 * p["test_error_clean"]), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))   # 30, not 3 x 10^1
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                       if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
        ax.set_xlabel(label)
        ax.set_ylabel("CIFAR-10 test error (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle("accuracy against inference cost: o clean, x shadowed (80 % x 0.3), * the paper", fontsize=9)
    fig.tight_layout()
    from edgehebb.io import save_figure

    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
