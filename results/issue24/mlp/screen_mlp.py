"""Issue 24 screen: a hidden layer in the head, on the cached features of a shipped model.

The shipped heads were linear (softmax on the standardised pooled features). This trains the head of
``head_hidden`` = H (``Linear(D, H) -> ReLU -> Linear(H, classes)``, edgehebb.nnl.layers.HiddenHead)
with ``edgehebb.nnl.train.train_head`` under the shipped model's recipe with the overrides in HEADS
(its dropout on the standardised features then also on the hidden units; Adam, cosine, the best
epoch on the 5,000-image validation split), on the feature caches ``edgehebb train`` wrote for the
shipped model (found by content, ``../combo/screen_combo.py``; nothing is recomputed). Each head is
written as a model directory under OUT (the shipped model's blocks, bit for bit, and the new head);
one JSON row per head on stdout, epoch lines on stderr.

    MODEL=fig2_left-cifar10 HEADS='[{"head_hidden": 1024, "lr": 1e-3, "epochs": 20}]' OUT=runs/mlp \
        THREADS=1 python results/issue24/mlp/screen_mlp.py
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "combo"))
from screen_combo import cached  # noqa: E402

from edgehebb.data import load_split  # noqa: E402
from edgehebb.nnl import load_model, save_model, with_options  # noqa: E402
from edgehebb.nnl.model import build_net  # noqa: E402
from edgehebb.nnl.train import TrainConfig, train_head, training_images  # noqa: E402


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    model = os.environ.get("MODEL", "fig2_left-cifar10")
    heads = json.loads(os.environ.get("HEADS", '[{"head_hidden": 1024}]'))
    out = Path(os.environ.get("OUT", "runs/mlp"))
    shipped, config = load_model(model)
    recipe = TrainConfig(**config["fit"])
    train = load_split(os.environ["EDGEHEBB_DATA"], "train", progress=False)
    x = training_images(train, recipe)
    feats = cached(shipped, x)
    flipped = cached(shipped, np.ascontiguousarray(x[:, :, ::-1]))
    for h in heads:
        h = dict(h)
        spec = with_options(shipped.spec, head_hidden=h.pop("head_hidden"))
        cfg = dataclasses.replace(recipe, **h)
        net = build_net("nnl", spec)
        net.blocks.load_state_dict(shipped.blocks.state_dict())   # the shipped tensors, bit for bit
        t0 = time.perf_counter()
        result = train_head(net, feats, train.y, cfg, flipped=flipped, progress=False,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
        name = "-".join([Path(model).name, f"hidden{spec.head_hidden}"] + [f"{k}{v}" for k, v in sorted(h.items())])
        save_model(out / name, net, train.classes, {"fit": dataclasses.asdict(cfg), "training": result})
        print(json.dumps({"model": model, "head_hidden": spec.head_hidden, "head": h,
                          "val_accuracy": result["val_accuracy"], "best_epoch": result["best_epoch"],
                          "seconds": round(time.perf_counter() - t0),
                          "curve": [r["val_accuracy"] for r in result["history"]], "out": str(out / name)}),
              flush=True)


if __name__ == "__main__":
    main()
