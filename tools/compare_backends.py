#!/usr/bin/env python3
"""Does the learning backend change downstream accuracy? (issue 3: quality is not traded for speed)

For every seed and backend, learn the fig. 2-left bank (K=400, W=4, all training images) and train
the fig. 2-left softmax head on it (validation-chosen epoch), then measure clean test accuracy.
The float32 rule amplifies rounding (a 1e-7 change of M0 moves the final filters a lot, see
notes/pycuda-kernel.md), so single runs differ; the question is whether the per-backend means do.
``--batches`` also learns with the given minibatch sizes (last backend, seed 0) to find the largest B that
still learns good filters. Prints one JSON line per run, then a summary line.

  python tools/compare_backends.py --data $EDGEHEBB_DATA --out runs/compare --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from edgehebb.data import load_split, resolve_data_root
from edgehebb.evaluate.accuracy import evaluate
from edgehebb.learn.loop import LearnConfig
from edgehebb.devices import resolve_device
from edgehebb.learn.directory import learn_to_dir
from edgehebb.nnl.model import load_model
from edgehebb.nnl import load_spec
from edgehebb.nnl.train import TrainConfig, train_to_dir


def run(train, test, out: Path, backend: str, seed: int, batch: int, args) -> dict:
    bank = out / f"bank-{backend}-s{seed}-B{batch}"
    model = out / f"model-{backend}-s{seed}-B{batch}"
    t0 = time.perf_counter()
    if not (bank / "filters.safetensors").is_file():
        cfg = LearnConfig(filters=400, kernel=4, epochs=args.learn_epochs, batch=batch, seed=seed)
        learn_to_dir(train.x, cfg, bank, data_key={"source": train.source, "images": len(train)}, backend=backend,
                     device=args.device, resume=(bank / "checkpoint.safetensors").is_file(), progress=False,
                     log=lambda s: print(s, file=sys.stderr))
    learn_s = time.perf_counter() - t0
    if not (model / "config.json").is_file():
        train_to_dir(load_spec("fig2_left"), train, model, training=TrainConfig(epochs=args.head_epochs, seed=seed),
                     filters_from=[bank], device=args.device, progress=False, log=lambda s: None)
    net, config = load_model(model, args.device)
    r = evaluate(net, test, config["classes"], sweep=None, device=args.device, progress=False)
    return {"backend": backend, "seed": seed, "batch": batch, "learn_seconds": learn_s,
            "val_accuracy": config["training"]["val_accuracy"], "test_accuracy": r["clean"]["accuracy"],
            "shadowed_accuracy": r["shadowed"]["accuracy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backends", default="torch,pycuda")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--batches", default="", help="Extra minibatch sizes to try with the last backend (pycuda by default), seed 0.")
    ap.add_argument("--learn-epochs", type=int, default=1)
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    root = resolve_data_root(args.data, download=False)
    train = load_split(root, "train", limit=args.limit, progress=False)
    test = load_split(root, "test", progress=False)
    backends = args.backends.split(",")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for backend in backends:
            rows.append(run(train, test, args.out, backend, seed, args.batch, args))
            print(json.dumps(rows[-1]), flush=True)
    for b in (int(x) for x in args.batches.split(",") if x):
        row = run(train, test, args.out, backends[-1], 0, b, args)
        print(json.dumps(row), flush=True)
    summary = {}
    for backend in backends:
        accs = [r["test_accuracy"] for r in rows if r["backend"] == backend]
        summary[backend] = {"mean": statistics.mean(accs), "stdev": statistics.stdev(accs) if len(accs) > 1 else None,
                            "runs": accs}
    if len(backends) == 2:
        a, b = (summary[x]["mean"] for x in backends)
        summary["difference_points"] = 100 * (b - a)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
