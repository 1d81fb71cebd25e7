#!/usr/bin/env python3
"""Screen the NNL op's robustness options (issue 15) on the validation split: semi-saturation sigma
and gray-world colour normalisation, on a fixed filter bank, clean and under camera conditions.

For every (colour norm, sigma) the softmax head is trained on the subset's training images (the
epoch chosen on the held-out validation images, as ``edgehebb train``), then evaluated on those
validation images clean and under each condition (``edgehebb.camera.conditions.apply_condition``, seed 0).
Nothing here reads the test split. Each row's head is saved beside it, so a later run with more
``--conditions`` computes only the new columns (features of the conditioned validation images).

Cost: the dot products and squared patch norms of a batch are computed once per colour norm and
every sigma is derived from them by ``NNLConv.divide`` (u = v / (sqrt(|v|^2 + sigma^2) + eps), the
block's own division; checked bitwise against ``NNLNet.features`` on a few images before the run).

  OMP_NUM_THREADS=1 python tools/screen_robustness.py --data $EDGEHEBB_DATA --out runs/issue15-screen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgehebb import threads as thread_policy
from edgehebb.camera.conditions import apply_condition
from edgehebb.data import load_split, resolve_data_root
from edgehebb.nnl.features import images_to_tensor
from edgehebb.io import atomic_write, atomic_write_json, load_tensors, read_json, save_tensors
from edgehebb.nnl.model import load_model
from edgehebb.nnl import NNLNet, colour_normalise, with_options
from edgehebb.nnl.layers import _conv_ieee
from edgehebb.nnl.train import TrainConfig, train_head, validation_split

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
                pooled = F.max_pool2d(layer.divide(dot, sq, s), layer.pool, layer.pool_stride)
                out[s][lo:lo + batch] = pooled.clamp(0, 1.0).pow(layer.power).flatten(1).numpy()
    return out


def _pooled_cells(net: NNLNet) -> int:
    b, (_, h, w) = net.spec.blocks[0], net.spec.input
    return int(np.prod(b.out_size(h, w)))


def parse_conditions(text: str) -> list[tuple[str, float]]:
    """``"low-light=6.5,wb-warm=241"`` -> [(name, severity), ...], each checked."""
    from edgehebb.camera.conditions import check_severity

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        out.append((name, check_severity(name, value)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-10 [default: $EDGEHEBB_DATA]")
    ap.add_argument("--out", type=Path, required=True, help="Folder for rows, heads and the summary.")
    ap.add_argument("--model", default="fig2_left-cifar10", help="Model whose one-block bank and spec are used.")
    ap.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.4", help="Comma-separated sigma grid.")
    ap.add_argument("--colour-norms", default="none,gray-world")
    ap.add_argument("--conditions", default=",".join(f"{n}={s:g}" for n, s in CONDITIONS),
                    help="NAME=SEVERITY,... applied to the validation images (seed 0). A row already in OUT gets "
                         "only its missing columns, from its saved head.")
    ap.add_argument("--train-limit", type=int, default=20000, help="Class-balanced training images (10 %% validation).")
    ap.add_argument("--augment", default="", help="Train-time augmentation baseline: condition names (comma-"
                    "separated) drawn per training image by edgehebb.camera.augment.augment; the validation images "
                    "stay clean. Rows are kept apart from the unaugmented ones (OUT/rows/*-aug.*).")
    ap.add_argument("--augment-fraction", type=float, default=0.5, help="Share of training images perturbed.")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with thread_policy.configured(args.threads):   # and back after: main() is also called from Python
        return screen(args)


def screen(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {s}", file=sys.stderr, flush=True)

    base, _ = load_model(args.model)
    bank = base.blocks[0].weight.detach().clone()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    data = load_split(resolve_data_root(args.data, download=False), "train", limit=args.train_limit, progress=False)
    fit = TrainConfig()   # the shipped model's head settings: Adam 3e-4, up to 60 epochs, 10 % validation, seed 0
    _, val_idx = validation_split(data.y, fit.val_fraction, fit.seed)
    val_x, val_y = data.x[val_idx], data.y[val_idx]
    wanted = [f"{n}@{s:g}" for n, s in parse_conditions(args.conditions)]
    train_x, tag = data.x, ""
    if args.augment:
        from edgehebb.camera.augment import augment

        train_x, applied = augment(data.x, args.augment, args.augment_fraction, seed=1)
        train_x[val_idx] = data.x[val_idx]   # choose the epoch on clean validation images, as without
        tag = "-aug"
        held_out = set(val_idx.tolist())
        log(f"augmented {sum(a is not None for i, a in enumerate(applied) if i not in held_out)} "
            f"training images with {args.augment}")
    sets: dict[str, np.ndarray] = {}

    def conditioned(key: str) -> np.ndarray:
        if key not in sets:
            name, _, severity = key.partition("@")
            sets[key] = apply_condition(val_x, name, float(severity), seed=0)
        return sets[key]

    subset = {"data": data.source, "train_images": len(data) - len(val_idx), "val_images": len(val_idx),
              "model": args.model, "conditions_seed": 0}
    log(f"{subset}")
    rows_dir = args.out / "rows"
    rows = []
    for colour_norm in args.colour_norms.split(","):
        def where(s: float, ext: str) -> Path:
            return rows_dir / f"{colour_norm}-s{s:g}{tag}.{ext}"

        done = {s: read_json(where(s, "json")) for s in sigmas
                if where(s, "json").is_file() and where(s, "safetensors").is_file()}
        train = [s for s in sigmas if s not in done]
        missing = {s: [k for k in wanted if f"val_{k}" not in done[s]] for s in done}
        todo = train + [s for s in done if missing[s]]
        if todo:
            nets = {s: NNLNet(with_options(base.spec, sigma=s, colour_norm=colour_norm), [bank]) for s in todo}
            probe = images_to_tensor(val_x[:6])
            for s, f in features(nets[todo[0]], val_x[:6], todo, colour_norm).items():   # the shortcut == nnl
                assert np.array_equal(f, nets[s].features(probe).detach().numpy()), f"sigma {s}: differs from NNLNet"
            t0 = time.perf_counter()
            train_f = features(nets[train[0]], train_x, train, colour_norm) if train else {}
            keys = sorted({k for s in todo for k in (wanted if s in train else missing[s])}, key=wanted.index)
            cond_f = {k: features(nets[todo[0]], conditioned(k), todo, colour_norm) for k in keys}
            log(f"{colour_norm}: features of {len(data) * bool(train) + len(val_idx) * len(keys)} images for sigma "
                f"{todo} in {time.perf_counter() - t0:.0f}s")
        for s in sigmas:
            if s not in todo:
                rows.append(done[s])
                continue
            t1 = time.perf_counter()
            net = nets[s]
            if s in train:
                result = train_head(net, train_f.pop(s), data.y, fit, progress=False, log=lambda _: None)
                row = {"colour_norm": colour_norm, "sigma": s, "val_clean": result["val_accuracy"],
                       "best_epoch": result["best_epoch"]}
                if args.augment:
                    row["augment"] = {"conditions": args.augment, "fraction": args.augment_fraction, "seed": 1}
                save_tensors(where(s, "safetensors"), {k: v for k, v in net.state_dict().items()
                                                       if not k.startswith("blocks.")})
            else:
                row = done[s]
                state, _ = load_tensors(where(s, "safetensors"))
                net.load_state_dict({**net.state_dict(), **state})
            with torch.no_grad():
                for k in cond_f:
                    if s in cond_f[k]:
                        logits = net.classify(torch.from_numpy(cond_f[k].pop(s)))
                        row[f"val_{k}"] = float((logits.argmax(1).numpy() == val_y).mean())
            row.update(subset=subset, threads=args.threads)
            row.setdefault("head_seconds", round(time.perf_counter() - t1, 1))
            atomic_write_json(where(s, "json"), row)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k not in ("subset",)))
            rows.append(row)
    lines = ["| colour norm | sigma | augment | clean | " + " | ".join(wanted) + " | worst / clean |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in wanted) + " | --- |"]
    for r in rows:
        cast_noise = [r[f"val_{k}"] for k in wanted if not k.startswith("shadow")]
        worst = f"{min(cast_noise) / r['val_clean']:.2f}" if cast_noise else ""
        lines.append(f"| {r['colour_norm']} | {r['sigma']:g} | {r.get('augment', {}).get('conditions', '')} | "
                     f"{100 * r['val_clean']:.2f} | "
                     + " | ".join(f"{100 * r[f'val_{k}']:.2f}" for k in wanted) + f" | {worst} |")
    summary = {"rows": rows, "subset": subset, "wall_seconds": round(time.perf_counter() - t_start),
               "threads": args.threads, "command": " ".join(sys.argv)}
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write(args.out / "summary.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps([{k: v for k, v in r.items() if k != "subset"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
