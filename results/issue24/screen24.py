"""Issue 24's screening, kept as the record of results/issue24/screen-rows.jsonl (RESULTS.md, "What we
tried (issue 24)"): pooled cosines of a fixed bank under image transforms (mirror, shifts, the camera conditions), cached; heads on standardised ReLU(c)^n with mirror images, dropout, schedules; validation only.

These were one-off scripts, not tools: they import edgehebb as it was at commit d70d9cf (before the
restructure of issue 23), so run them with PYTHONPATH at a checkout of that commit; paths are this
session's scratch folders.
"""
import argparse, json, os, sys, time, hashlib
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from edgehebb.data import load_split
from edgehebb.io import load_tensors, load_filters
from edgehebb.nnl import NNLNet, spec_from_dict
from edgehebb.features import compute_features
from edgehebb.train import validation_split

DATA = "/work/shared/data/cifar10"
CACHE = Path("/work/scratch/cache")
CACHE.mkdir(parents=True, exist_ok=True)
AUG = "low-light,wb-warm,wb-cool,tint-green,tint-magenta"


def bank(name):
    if name == "shipped":
        t, _ = load_tensors("/work/main/models/fig2_left-cifar10/model.safetensors")
        return t["blocks.0.weight"]
    return load_filters(name)[0]


def make_net(b, stride, pool=11, colour="gray-world", power=1.0, padding=0):
    K, C, W, _ = b.shape
    d = {"name": "s", "blocks": [{"kernel": W, "filters": K, "power": power, "pool": pool,
                                  "pool_stride": stride, "padding": padding}], "colour_norm": colour}
    spec = spec_from_dict(d)
    return NNLNet(spec, [b])


def images(which, train):
    x = np.asarray(train.x)
    if which == "clean":
        return x
    if which == "flip":
        return x[:, :, ::-1].copy()
    if which.startswith("aug"):
        from edgehebb.conditions import augment
        names = AUG if which in ("aug", "aug-flip") else AUG + ",gamma-high,gamma-low"
        xa, _ = augment(x, names, 0.5, seed=0)
        return xa[:, :, ::-1].copy() if which.endswith("-flip") else xa
    if which.startswith("shift"):   # shiftDX_DY with zero fill
        dx, dy = map(int, which[5:].split("_"))
        out = np.zeros_like(x)
        H, W = x.shape[1:3]
        out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
        return out
    raise SystemExit(f"unknown set {which}")


def feats_path(bank_name, stride, which, split, colour, pool=11, padding=0):
    tag = hashlib.sha1(bank_name.encode()).hexdigest()[:8]
    return CACHE / f"{tag}-p{pool}s{stride}pad{padding}-{colour}-{split}-{which}.npy"


def get_feats(bank_name, stride, which, split, colour="gray-world", pool=11, padding=0, data=None):
    p = feats_path(bank_name, stride, which, split, colour, pool, padding)
    if p.is_file():
        return np.load(p, mmap_mode="r")
    ds = data or load_split(DATA, split, progress=False)
    net = make_net(bank(bank_name), stride, pool, colour, padding=padding)
    t0 = time.time()
    x = images(which, ds)
    f = compute_features(net, x, progress=False, threads=1).astype(np.float16 if os.environ.get("F16") else np.float32)
    np.save(str(p) + ".tmp.npy", f)
    os.replace(str(p) + ".tmp.npy", p)
    print(f"feats {p.name} {f.shape} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return np.load(p, mmap_mode="r")


def train_head(Xtr, ytr, Xval, yval, n, epochs=60, lr=3e-4, batch=256, dropout=0.0, wd=0.0, seed=0,
               schedule="none", label_smooth=0.0):
    # standardise ReLU(c)^n with stats from the training rows (float64)
    def powf(a):
        a = torch.from_numpy(np.asarray(a, np.float32))
        return a.clamp(0, 1).pow(n) if n != 1 else a.clamp(0, 1)
    Xt = torch.cat([powf(Xtr[lo:lo + 8192]) for lo in range(0, len(Xtr), 8192)])
    mean = Xt.double().mean(0)
    std = Xt.double().std(0, unbiased=False)
    scale = torch.where(std > 1e-30, 1 / std.clamp_min(1e-30), torch.zeros_like(std)).float()
    mean = mean.float()
    Xt.sub_(mean).mul_(scale)
    Xv = (powf(Xval) - mean) * scale
    yt, yv = torch.from_numpy(ytr), torch.from_numpy(yval)
    torch.manual_seed(seed)
    head = torch.nn.Linear(Xt.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * ((len(Xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cos" else None
    best, best_ep, hist, best_state = -1, 0, [], None
    for ep in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + ep)
        order = torch.randperm(len(Xt), generator=g)
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            xb = Xt[idx]
            if dropout:
                xb = F.dropout(xb, dropout, True)
            loss = F.cross_entropy(head(xb), yt[idx], label_smoothing=label_smooth)
            opt.zero_grad(); loss.backward(); opt.step()
            if sched: sched.step()
        with torch.no_grad():
            acc = float((head(Xv).argmax(1) == yv).float().mean())
        hist.append(acc)
        if acc > best:
            best, best_ep = acc, ep + 1
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return best, best_ep, hist, (head, mean, scale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--bank", default="shipped")
    ap.add_argument("--stride", type=int, default=6)
    ap.add_argument("--pool", type=int, default=11)
    ap.add_argument("--padding", type=int, default=0)
    ap.add_argument("--colour", default="gray-world")
    ap.add_argument("--sets", default="clean")
    ap.add_argument("--train", default="clean")    # sets whose training rows are used (val rows always clean)
    ap.add_argument("--n", default="40")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--schedule", default="none")
    ap.add_argument("--smooth", type=float, default=0.0)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    train = load_split(DATA, "train", progress=False)
    if a.cmd == "feats":
        for s in a.sets.split(","):
            split = "test" if s.startswith("test-") else "train"
            get_feats(a.bank, a.stride, s[5:] if split == "test" else s, split, a.colour, a.pool, a.padding,
                      data=None if split == "test" else train)
        return
    tr_idx, val_idx = validation_split(train.y, 0.1, 0)
    sets = [get_feats(a.bank, a.stride, s, "train", a.colour, a.pool, a.padding, data=train) for s in a.train.split(",")]
    clean = get_feats(a.bank, a.stride, "clean", "train", a.colour, a.pool, a.padding, data=train)
    Xtr = np.concatenate([np.asarray(f[tr_idx]) for f in sets])
    ytr = np.concatenate([train.y[tr_idx]] * len(sets))
    Xval, yval = np.asarray(clean[val_idx]), train.y[val_idx]
    for n in map(float, a.n.split(",")):
        t0 = time.time()
        best, ep, hist, _ = train_head(Xtr, ytr, Xval, yval, n, a.epochs, a.lr, dropout=a.dropout, wd=a.wd,
                                       schedule=a.schedule, label_smooth=a.smooth)
        row = {"label": a.label, "bank": a.bank, "pool": a.pool, "stride": a.stride, "padding": a.padding,
               "colour": a.colour, "train": a.train, "n": n, "epochs": a.epochs, "lr": a.lr, "dropout": a.dropout,
               "wd": a.wd, "schedule": a.schedule, "smooth": a.smooth, "val": best, "best_epoch": ep,
               "seconds": round(time.time() - t0), "hist": [round(h, 4) for h in hist]}
        print(json.dumps(row), flush=True)
        with open("/work/scratch/rows.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
