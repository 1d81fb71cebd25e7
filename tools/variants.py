#!/usr/bin/env python3
"""Screen accuracy variants of the NNL-CONV pipeline on a stated CIFAR-10 subset: cached, resumable.

A variant names its learning settings, block settings, head settings and powers in one JSON object;
a variants file is a JSON list of them (tools/variants/*.json). For example::

  {"name": "plain-cos", "spec": "fig2_left",
   "learn": {"init": "patches", "rank_by": "cosine", "delta": 0.1},
   "block": {"center": false}, "powers": [1, 10, 40], "fit": {"standardise": true}}

- ``spec``: a shipped spec name or an inline spec object (default fig2_left).
- ``block``: BlockSpec fields set on every block (center, pool, pool_stride, padding, sigma, ...); the
  net's colour normalisation goes in an inline ``spec`` (``"colour_norm": "gray-world"``).
- ``learn``: LearnConfig fields (K, W and the preprocessing follow each block unless given here).
- ``bank``: instead of learning, a filter-bank or model directory holding the bank (one-block specs).
- ``powers``: the n of every block, one row per value (default: the spec's own n).
- ``fit``: TrainConfig fields of the softmax head.

Every row (``OUT/rows/<variant>-n<n>.json``) reports validation accuracy (the head's epoch is chosen
on it), clean and shadowed test error, dead units of each bank, and pooled-feature statistics.
Choose between variants on validation accuracy; test error is reported, never used to choose.

Cost is kept down three ways: banks are learned once per distinct setting into OUT/banks (resumable),
the pooled cosines of a bank and block layout are computed once into OUT/pooled and raised to every
n (exact: ReLU(x)^n is monotonic, so it commutes with the max-pool), and a row whose settings are
unchanged is read back instead of run. Default subset (ACCURACY-LOG.md's): banks from 10,000
training images, heads on 20,000 (10 % held out for validation), 5,000 test images, all
class-balanced; ``--learn-limit 0 --train-limit 0 --test-limit 0`` uses all of them.

  python tools/variants.py --data ../shared/data/cifar10 --out runs/variants tools/variants/issue13.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgehebb import threads as thread_policy
from edgehebb.data import load_split, resolve_data_root
from edgehebb.errors import EdgehebbError
from edgehebb.nnl.features import compute_features
from edgehebb.io import atomic_write, atomic_write_json, load_filters, read_json
from edgehebb.learn.loop import LearnConfig
from edgehebb.learn.directory import learn_to_dir
from edgehebb.nnl import NetSpec, NNLNet, feature_dim, load_spec, spec_from_dict
from edgehebb.learn.patches import flat_cosines
from edgehebb.camera.shadow import COVERAGE, INTENSITY, darken, shadow_masks
from edgehebb.nnl.banks import find_bank
from edgehebb.nnl.train import TrainConfig, train_head

VARIANT_KEYS = {"name", "spec", "block", "learn", "bank", "powers", "fit", "note"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_variant(v: dict, where: str) -> dict:
    """The variant with its spec resolved and its keys checked; errors name ``where``."""
    if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"]:
        raise EdgehebbError(f"{where}: a variant is an object with a non-empty 'name'")
    if unknown := set(v) - VARIANT_KEYS:
        raise EdgehebbError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(VARIANT_KEYS)}")
    raw = v.get("spec", "fig2_left")
    spec = load_spec(raw) if isinstance(raw, str) else spec_from_dict(raw, f"{where}: spec")
    block = v.get("block", {})
    fields = {f.name for f in dataclasses.fields(spec.blocks[0])}
    if unknown := set(block) - fields:
        raise EdgehebbError(f"{where}: unknown block field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    d = spec.to_dict()
    d["blocks"] = [{**b, **block} for b in d["blocks"]]
    d["name"] = v["name"]
    spec = spec_from_dict(d, f"{where}: spec with the block settings")
    learn_fields = {f.name for f in dataclasses.fields(LearnConfig)}
    if unknown := set(v.get("learn", {})) - learn_fields:
        raise EdgehebbError(f"{where}: unknown learn field(s) {sorted(unknown)}; allowed: {sorted(learn_fields)}")
    fit_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := set(v.get("fit", {})) - fit_fields:
        raise EdgehebbError(f"{where}: unknown fit field(s) {sorted(unknown)}; allowed: {sorted(fit_fields)}")
    powers = v.get("powers") or [None]
    if not isinstance(powers, list) or not all(p is None or (isinstance(p, (int, float)) and p > 0) for p in powers):
        raise EdgehebbError(f"{where}: 'powers' must be a list of numbers > 0")
    if v.get("bank") and len(spec.blocks) != 1:
        raise EdgehebbError(f"{where}: 'bank' serves one-block specs only")
    return {**v, "spec": spec, "powers": powers}


def load_variants(path: Path) -> list[dict]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgehebbError(f"cannot read variants file {path}: {e}") from None
    if not isinstance(raw, list):
        raise EdgehebbError(f"{path}: expected a JSON list of variant objects")
    variants = [parse_variant(v, f"{path}[{i}]") for i, v in enumerate(raw)]
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise EdgehebbError(f"{path}: variant names must be unique")
    return variants


class Screen:
    """One subset of CIFAR-10 and one output folder; learns banks and pooled maps on demand."""

    def __init__(self, args, log):
        self.args, self.log, self.out = args, log, args.out
        root = resolve_data_root(args.data, download=False)
        quiet = not args.progress
        self.learn_set = load_split(root, "train", limit=args.learn_limit or None, progress=not quiet)
        self.train = load_split(root, "train", limit=args.train_limit or None, progress=not quiet)
        self.test = load_split(root, "test", limit=args.test_limit or None, progress=not quiet)
        n, h, w, _ = self.test.x.shape
        self.shadowed = darken(self.test.x, shadow_masks(n, h, w, COVERAGE, 0).astype(bool), INTENSITY)
        self.subset = {"data": self.train.source, "learn_images": len(self.learn_set),
                       "train_images": len(self.train), "test_images": len(self.test)}

    # ---------------------------------------------------------------- banks
    def bank(self, variant: dict, block, index: int) -> tuple[torch.Tensor, dict]:
        """(K, C, W, W) bank for ``block`` and its learning record (dead units, norm error)."""
        if variant.get("bank"):
            found = find_bank([Path(variant["bank"])], block, variant["spec"].input[0])
            if found is None:
                raise EdgehebbError(f"{variant['name']}: no bank in {variant['bank']} fits block {index}")
            return found[0].float(), {"from": str(found[1])}
        settings = {"filters": block.filters, "kernel": block.kernel, "preprocess": block.preprocess,
                    **variant.get("learn", {})}
        config = LearnConfig(**settings)
        key = _digest({"learn": dataclasses.asdict(config), "data": self.subset["data"],
                       "images": self.subset["learn_images"]})
        where = self.out / "banks" / f"W{block.kernel}-K{block.filters}-{key}"
        if not (where / "filters.safetensors").is_file():
            self.log(f"{variant['name']}: learning bank {where.name} {settings}")
            learn_to_dir(self.learn_set.x, config, where, backend="torch", device="cpu",
                         data_key={"source": self.learn_set.source, "split": "train", "images": len(self.learn_set)},
                         resume=(where / "checkpoint.safetensors").is_file(), progress=self.args.progress,
                         threads=self.args.threads, log=self.log)
        filters, config_json = load_filters(where)
        last = (config_json.get("history") or [{}])[-1]
        flat_cos = flat_cosines(filters)   # a plain-norm bank that collapsed shows here (dead units do not)
        return filters, {"dir": str(where), "learn": dataclasses.asdict(config),
                         "dead_fraction": last.get("dead_fraction"), "norm_error": last.get("norm_error"),
                         "flat_cos_quantiles": [round(float(q), 4) for q in flat_cos.quantile(
                             torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))]}

    # ---------------------------------------------------------------- pooled cosines
    def pooled(self, spec: NetSpec, bank: torch.Tensor, index: int) -> dict[str, np.ndarray]:
        """Pooled clip(cos, 0, 1) (power 1) of block ``index`` on train, test and shadowed test."""
        block = dataclasses.replace(spec.blocks[index], power=1.0)
        one = dataclasses.replace(spec, blocks=(block,))
        settings = {"block": dataclasses.asdict(block), "bank": hashlib.sha256(bank.numpy().tobytes()).hexdigest(),
                    "subset": self.subset}
        if spec.colour_norm != "none":   # the net's colour normalisation changes the maps (older keys unchanged)
            settings["colour_norm"] = spec.colour_norm
        if not block.sigma:
            settings["block"].pop("sigma")
        key = _digest(settings)
        path = self.out / "pooled" / f"{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in ("train", "test", "shadowed")}
        net = NNLNet(one, [bank])
        maps = {name: compute_features(net, x, progress=self.args.progress, desc=f"pooled {name}")
                for name, x in (("train", self.train.x), ("test", self.test.x), ("shadowed", self.shadowed))}
        buf = io.BytesIO()
        np.savez(buf, **maps)
        atomic_write(path, buf.getvalue())
        return maps

    # ---------------------------------------------------------------- one variant
    def run(self, variant: dict) -> list[dict]:
        spec: NetSpec = variant["spec"]
        banks, records, pooled = [], [], []
        for i, block in enumerate(spec.blocks):
            bank, record = self.bank(variant, block, i)
            banks.append(bank)
            records.append(record)
        rows = []
        for n in variant["powers"]:
            row_spec = spec if n is None else dataclasses.replace(
                spec, blocks=tuple(dataclasses.replace(b, power=float(n)) for b in spec.blocks))
            name = variant["name"] if n is None else f"{variant['name']}-n{n:g}"
            settings = {"variant": {k: v for k, v in variant.items() if k not in ("spec", "powers")},
                        "spec": row_spec.to_dict(), "subset": self.subset, "seed": self.args.seed}
            cached = self.out / "rows" / f"{name}.json"
            if cached.is_file() and read_json(cached).get("settings") == settings:
                self.log(f"{name}: cached")
                rows.append(read_json(cached))
                continue
            if not pooled:
                pooled = [self.pooled(spec, bank, i) for i, bank in enumerate(banks)]
            t0 = time.perf_counter()
            row = {"row": name, **self.fit_row(row_spec, banks, pooled, variant.get("fit", {})),
                   "banks": records, "seconds": round(time.perf_counter() - t0, 1), "threads": self.args.threads,
                   "settings": settings}
            atomic_write_json(cached, row)
            self.log(f"{name}: val {row['val_accuracy']:.2%}  test error {row['test_error']:.2%}  "
                     f"shadowed {row['shadowed_error']:.2%}")
            rows.append(row)
        return rows

    def fit_row(self, spec: NetSpec, banks: list[torch.Tensor], pooled: list[dict], fit: dict) -> dict:
        def features(split: str) -> np.ndarray:
            parts = [np.power(p[split].astype(np.float64), b.power) for p, b in zip(pooled, spec.blocks)]
            return np.concatenate(parts, axis=1).astype(np.float32)

        ftr = features("train")
        net = NNLNet(spec, banks)
        assert ftr.shape[1] == feature_dim(spec)
        cfg = TrainConfig(**{"seed": self.args.seed, **fit})
        result = train_head(net, ftr, self.train.y, cfg, progress=self.args.progress, log=lambda s: None)
        net.eval()
        errors = {}
        with torch.no_grad():
            for split in ("test", "shadowed"):
                logits = net.classify(torch.from_numpy(features(split)))
                errors[split] = float((logits.argmax(1).numpy() != self.test.y).mean())
        cos = np.concatenate([p["train"].ravel() for p in pooled])
        top = -np.sort(-ftr.astype(np.float64), axis=0)[: max(1, len(ftr) // 100)].sum(0)
        share = top / np.maximum(ftr.astype(np.float64).sum(0), 1e-300)
        return {"val_accuracy": result["val_accuracy"], "best_epoch": result["best_epoch"],
                "test_error": errors["test"], "shadowed_error": errors["shadowed"],
                "features": {"dim": int(ftr.shape[1]),
                             "silent_fraction": float((ftr.std(0) == 0).mean()),
                             "top1pct_mass_median": float(np.median(share)),
                             "pooled_cos_quantiles": [float(q) for q in np.quantile(cos, [0.1, 0.5, 0.9])]}}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | val acc | test err | shadowed err | dead units | silent features | top-1% mass |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        dead = "/".join("" if b.get("dead_fraction") is None else f"{b['dead_fraction']:.1%}" for b in r["banks"])
        f = r["features"]
        lines.append(f"| {r['row']} | {r['val_accuracy']:.2%} | {r['test_error']:.2%} | {r['shadowed_error']:.2%} | "
                     f"{dead} | {f['silent_fraction']:.1%} | {f['top1pct_mass_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", type=Path, help="JSON list of variant objects")
    ap.add_argument("--data", default=None, help="CIFAR-10 (image-folder tree, pickles or .npz) [default: $EDGEHEBB_DATA]")
    ap.add_argument("--out", type=Path, required=True, help="Folder for banks, pooled maps and rows.")
    ap.add_argument("--only", default="", help="Comma-separated variant names to run (default: all).")
    ap.add_argument("--learn-limit", type=int, default=10000, help="Class-balanced images the banks learn from (0: all).")
    ap.add_argument("--train-limit", type=int, default=20000, help="Class-balanced images for the head (0: all).")
    ap.add_argument("--test-limit", type=int, default=5000, help="Class-balanced test images (0: all).")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine one thread outran two by 5x).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="Show progress bars.")
    args = ap.parse_args(argv)
    with thread_policy.configured(args.threads):   # and back after: main() is also called from Python
        return run(args)


def run(args: argparse.Namespace) -> int:

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    try:
        variants = load_variants(args.variants)
        if args.only:
            wanted = {s.strip() for s in args.only.split(",") if s.strip()}
            if missing := wanted - {v["name"] for v in variants}:
                raise EdgehebbError(f"no variant named {sorted(missing)} in {args.variants}")
            variants = [v for v in variants if v["name"] in wanted]
        screen = Screen(args, log)
        rows = [row for v in variants for row in screen.run(v)]
    except EdgehebbError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    atomic_write_json(args.out / "summary.json", rows)
    atomic_write(args.out / "summary.md", markdown(rows).encode())
    print(json.dumps([{k: r[k] for k in ("row", "val_accuracy", "test_error", "shadowed_error")} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
