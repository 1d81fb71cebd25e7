"""Issue 24 screen on the full data: heads on the cached features of shipped models' blocks.

Reads the feature caches `edgehebb train` wrote for the shipped models (the augmented training images
and their mirror images, ~/.cache/edgehebb/features), optionally side by side (MODELS=a,b: a network
whose blocks are a's then b's, as a spec with several blocks computes them), and trains heads with
`edgehebb.nnl.train.train_head` under the settings named in HEADS (JSON list of TrainConfig overrides
on top of the shipped recipe). Writes each head as a model directory under OUT, one JSON row per head
on stdout. Nothing is recomputed: a missing cache entry is an error.

    MODELS=fig2_left_wide-cifar10,fig2_left-cifar10 HEADS='[{}]' OUT=runs/combo THREADS=1 \
        python results/issue24/combo/screen_combo.py
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgehebb.data import load_split
from edgehebb.nnl.features import cache_dir, images_to_tensor
from edgehebb.nnl.layers import NNLNet
from edgehebb.nnl.model import load_model, save_model
from edgehebb.nnl.spec import spec_from_dict
from edgehebb.nnl.train import TrainConfig, train_head, training_images


class SideBySide:
    """Columns of several (N, D_i) arrays as one (N, sum D_i) array, read a slice at a time."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = (len(parts[0]), sum(p.shape[1] for p in parts))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        return np.concatenate([np.asarray(p[rows], np.float32) for p in self.parts], axis=1)


def cached(net, images):
    """The cache entry holding ``net``'s features of ``images``. Found by content, not by key: the key
    also hashes edgehebb/nnl/layers.py, which changed (not its arithmetic) after the models were trained."""
    with torch.no_grad():
        first, last = (net.features(images_to_tensor(images[s])).numpy() for s in (slice(0, 4), slice(-4, None)))
    for path in sorted(cache_dir().glob("*.npy")):
        f = np.load(path, mmap_mode="r")
        if f.shape == (len(images), first.shape[1]) and np.allclose(f[:4], first, rtol=1e-5, atol=1e-6) \
                and np.allclose(f[-4:], last, rtol=1e-5, atol=1e-6):
            print(f"{net.spec.name}: {path.name}", file=sys.stderr)
            return f
    sys.exit(f"no cached features of {net.spec.name} for these images in {cache_dir()}: train the model with "
             f"the shipped recipe first")


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    models = os.environ.get("MODELS", "fig2_left_wide-cifar10").split(",")
    heads = json.loads(os.environ.get("HEADS", "[{}]"))
    out = Path(os.environ.get("OUT", "runs/combo"))
    nets, configs = zip(*(load_model(m) for m in models), strict=True)
    recipe = TrainConfig(**configs[0]["fit"])
    IMAGES = ("augment", "augment_fraction", "seed", "val_fraction")   # the fields that decide the training images
    for c in configs[1:]:
        assert all(c["fit"][k] == configs[0]["fit"][k] for k in IMAGES), "the models were trained on different images"
        assert c["spec"].get("colour_norm") == configs[0]["spec"].get("colour_norm")
    train = load_split(os.environ["EDGEHEBB_DATA"], "train", progress=False)
    x = training_images(train, recipe)
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    feats = SideBySide([cached(n, x) for n in nets])
    flipped = SideBySide([cached(n, mirrored) for n in nets])
    spec_dict = dict(configs[0]["spec"])
    spec_dict["blocks"] = [b for c in configs for b in c["spec"]["blocks"]]
    spec_dict["name"] = "+".join(c["spec"]["name"] for c in configs)
    spec = spec_from_dict(spec_dict)
    banks = [(blk.unit_weight(), blk.whitening) if blk.whitening is not None else blk.unit_weight()
             for n in nets for blk in n.blocks]
    with torch.no_grad():   # the side-by-side network computes what the caches hold (first images only)
        got = NNLNet(spec, banks).features(images_to_tensor(x[:4]))   # the layers copy the banks they are given
        want = torch.from_numpy(feats[0:4])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"caches do not match: {(got - want).abs().max(1)}"
    for h in heads:
        cfg = dataclasses.replace(recipe, **h)
        net = NNLNet(spec, banks)
        t0 = time.perf_counter()
        result = train_head(net, feats, train.y, cfg, flipped=flipped, progress=False, log=lambda s: None)
        name = "-".join([spec.name] + [f"{k}{v}" for k, v in sorted(h.items())])
        save_model(out / name, net, train.classes, {"fit": dataclasses.asdict(cfg), "training": result})
        print(json.dumps({"models": models, "head": h, "val_accuracy": result["val_accuracy"],
                          "best_epoch": result["best_epoch"], "seconds": round(time.perf_counter() - t0),
                          "curve": [r["val_accuracy"] for r in result["history"]], "out": str(out / name)}), flush=True)


if __name__ == "__main__":
    main()
