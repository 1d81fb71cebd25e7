#!/usr/bin/env python3
"""Screen the NNL op's robustness options (issue 15) on the validation split: semi-saturation sigma
and gray-world colour normalisation, on a fixed filter bank, clean and under camera conditions.

For every (colour norm, sigma) the softmax head is trained on the subset's training images (the
epoch chosen on the held-out validation images, as ``edgehebb train``), then evaluated on those
validation images clean and under each condition (``edgehebb.conditions.apply_condition``, seed 0).
Nothing here reads the test split.

Cost: the dot products and squared patch norms of a batch are computed once per colour norm and
every sigma is derived from them (u = v / (sqrt(|v|^2 + sigma^2) + eps), the same float32 expression
as ``nnl.NNLConv``; checked bitwise against ``NNLNet.features`` on a few images before the run).

  OMP_NUM_THREADS=1 python tools/screen_robustness.py --data $EDGEHEBB_DATA --out runs/issue15-screen
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgehebb.conditions import apply_condition
from edgehebb.data import load_split, resolve_data_root
from edgehebb.features import images_to_tensor
from edgehebb.io import atomic_write, atomic_write_json, read_json
from edgehebb.model import load_model
from edgehebb.nnl import EPS, NNLNet, _conv_ieee, colour_normalise, with_options
from edgehebb.train import FitConfig, train_head, validation_split

# the shipped model's half-accuracy severities (RESULTS.md, camera conditions), and the paper's shadow
CONDITIONS = (("low-light", 6.5), ("wb-warm", 241.0), ("wb-cool", 91.0), ("shadow", 0.7))


def features(net: NNLNet, images: np.ndarray, sigmas: list[float], colour_norm: str, batch: int = 250) -> dict:
    """{sigma: (N, D) float32 features} of a one-block net for every sigma, one convolution per batch."""
    layer = net.blocks[0]
    m, ones = layer.unit_weight(), layer.ones
    out = {s: np.empty((len(images), layer.weight.shape[0] * _pooled_cells(net)), np.float32) for s in sigmas}
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            x = colour_normalise(images_to_tensor(images[lo:lo + batch]), colour_norm)
            dot, sq = _conv_ieee(x, m, layer.stride), _conv_ieee(x * x, ones, layer.stride)
            for s in sigmas:
                den = (sq + s ** 2 if s else sq).sqrt() + layer.eps
                pooled = F.max_pool2d(dot / den, layer.pool, layer.pool_stride)
                out[s][lo:lo + batch] = pooled.clamp(0, 1.0).pow(layer.power).flatten(1).numpy()
    return out


def _pooled_cells(net: NNLNet) -> int:
    b, (_, h, w) = net.spec.blocks[0], net.spec.input
    return int(np.prod(b.out_size(h, w)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-10 [default: $EDGEHEBB_DATA]")
    ap.add_argument("--out", type=Path, required=True, help="Folder for rows and the summary.")
    ap.add_argument("--model", default="fig2_left-cifar10", help="Model whose one-block bank and spec are used.")
    ap.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.4", help="Comma-separated sigma grid.")
    ap.add_argument("--colour-norms", default="none,gray-world")
    ap.add_argument("--train-limit", type=int, default=20000, help="Class-balanced training images (10 %% validation).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {s}", file=sys.stderr, flush=True)

    base, _ = load_model(args.model)
    bank = base.blocks[0].weight.detach().clone()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    data = load_split(resolve_data_root(args.data, download=False), "train", limit=args.train_limit, progress=False)
    fit = FitConfig()   # the shipped model's head settings: Adam 3e-4, up to 60 epochs, 10 % validation, seed 0
    _, val_idx = validation_split(data.y, fit.val_fraction, fit.seed)
    val_x, val_y = data.x[val_idx], data.y[val_idx]
    sets = {f"{n}@{s:g}": apply_condition(val_x, n, s, seed=0) for n, s in CONDITIONS}
    subset = {"data": data.source, "train_images": len(data) - len(val_idx), "val_images": len(val_idx),
              "model": args.model, "conditions_seed": 0}
    log(f"{subset}")
    rows_dir = args.out / "rows"
    rows = []
    for colour_norm in args.colour_norms.split(","):
        todo = [s for s in sigmas if not (rows_dir / f"{colour_norm}-s{s:g}.json").is_file()]
        for s in sigmas:
            if s not in todo:
                rows.append(read_json(rows_dir / f"{colour_norm}-s{s:g}.json"))
        if not todo:
            continue
        nets = {s: NNLNet(with_options(base.spec, sigma=s, colour_norm=colour_norm), [bank]) for s in todo}
        probe = images_to_tensor(val_x[:6])
        for s, f in features(nets[todo[0]], val_x[:6], todo, colour_norm).items():   # the screen's shortcut == nnl
            assert np.array_equal(f, nets[s].features(probe).detach().numpy()), f"sigma {s}: differs from NNLNet"
        t0 = time.perf_counter()
        train_f = features(nets[todo[0]], data.x, todo, colour_norm)
        cond_f = {k: features(nets[todo[0]], x, todo, colour_norm) for k, x in sets.items()}
        log(f"{colour_norm}: features of {len(data) + len(val_idx) * len(sets)} images for sigma {todo} "
            f"in {time.perf_counter() - t0:.0f}s")
        for s in todo:
            t1 = time.perf_counter()
            net = nets[s]
            result = train_head(net, train_f.pop(s), data.y, fit, progress=False, log=lambda _: None)
            row = {"colour_norm": colour_norm, "sigma": s, "val_clean": result["val_accuracy"],
                   "best_epoch": result["best_epoch"]}
            with torch.no_grad():
                for k in sets:
                    logits = net.classify(torch.from_numpy(cond_f[k].pop(s)))
                    row[f"val_{k}"] = float((logits.argmax(1).numpy() == val_y).mean())
            row.update(subset=subset, head_seconds=round(time.perf_counter() - t1, 1), threads=args.threads)
            atomic_write_json(rows_dir / f"{colour_norm}-s{s:g}.json", row)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k not in ("subset",)))
            rows.append(row)
    keys = ["val_clean"] + [f"val_{k}" for k in sets]
    lines = ["| colour norm | sigma | clean | " + " | ".join(sets) + " | worst / clean |",
             "| --- | --- | --- | " + " | ".join("---" for _ in sets) + " | --- |"]
    for r in rows:
        worst = min(r[f"val_{k}"] for k in sets if not k.startswith("shadow"))
        lines.append(f"| {r['colour_norm']} | {r['sigma']:g} | " + " | ".join(f"{100 * r[k]:.2f}" for k in keys)
                     + f" | {worst / r['val_clean']:.2f} |")
    summary = {"rows": rows, "subset": subset, "wall_seconds": round(time.perf_counter() - t_start),
               "threads": args.threads, "command": " ".join(sys.argv)}
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write(args.out / "summary.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps([{k: v for k, v in r.items() if k != "subset"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
