"""Issue 24's screening, kept as the record of results/issue24/screen-rows.jsonl (RESULTS.md, "What we
tried (issue 24)"): ZCA-whitened patches: the whitening of unit patches, a bank learned by the rank-update rule on 2 M whitened patches, pooled cosines, heads; validation only.

These were one-off scripts, not tools: they import edgehebb as it was at commit d70d9cf (before the
restructure of issue 23), so run them with PYTHONPATH at a checkout of that commit; paths are this
session's scratch folders.
"""
import argparse, json, os, sys, time
import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sys.path.insert(0, "/work/scratch")
from screen24 import train_head, CACHE, DATA
from edgehebb.data import load_split
from edgehebb.train import validation_split
from edgehebb.hebbian import rank_update


def gray(x):
    mu = x.mean(dim=(2, 3), keepdim=True)
    return x * (mu.mean(dim=1, keepdim=True) / mu.clamp_min(1e-3))


def to_t(a):
    return torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).float().div_(255.0)


def sample_patches(x_u8, n, seed, W=4):
    """All patch positions of ceil(n / 841) random training images (gray-world applied), n of them."""
    rng = np.random.default_rng(seed)
    per = (32 - W + 1) ** 2
    idx = np.sort(rng.choice(len(x_u8), -(-n // per), replace=False))
    out = []
    for lo in range(0, len(idx), 500):
        imgs = gray(to_t(x_u8[idx[lo:lo + 500]]))
        out.append(F.unfold(imgs, W).transpose(1, 2).reshape(-1, 3 * W * W))
    p = torch.cat(out)[:n]
    return p[torch.randperm(len(p), generator=torch.Generator().manual_seed(seed))]


def whitening(p, eps_rel):
    u = p / p.norm(dim=1, keepdim=True).clamp_min(1e-6)
    S = (u.T.double() @ u.double()) / len(u)
    lam, U = torch.linalg.eigh(S)
    eps = eps_rel * lam.mean()
    Z = U @ torch.diag((lam + eps).rsqrt()) @ U.T
    return Z.float(), lam


def learn(patches_w, K, seed, epochs=1, batch=1000, lr=0.02, delta=0.2):
    """Rank-update on whitened unit patches, cosine ranking, started on K distinct data patches."""
    u = patches_w / patches_w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    g = torch.Generator().manual_seed(seed)
    M = u[torch.randperm(len(u), generator=g)[:K]].clone()
    steps = epochs * (len(u) // batch)
    s = 0
    for ep in range(epochs):
        order = torch.randperm(len(u), generator=g)
        for lo in range(0, len(u) - batch + 1, batch):
            eps = lr * (1 - s / steps)
            rank_update(M, u[order[lo:lo + batch]], eps, 2.0, delta, 2, "cosine")
            s += 1
    return M


def features(x_u8, Z, M, stride, pool=11, W=4, batch=250, flip=False):
    Zk = Z.reshape(48, 3, W, W)
    Mu = M / M.norm(dim=1, keepdim=True)
    Meff = (Mu @ Z).reshape(-1, 3, W, W)
    out = []
    with torch.no_grad():
        for lo in range(0, len(x_u8), batch):
            x = gray(to_t(x_u8[lo:lo + batch]))
            if flip:
                x = x.flip(-1)
            x = x.contiguous(memory_format=torch.channels_last)
            dot = F.conv2d(x, Meff)
            wz = F.conv2d(x, Zk)
            nrm = wz.pow(2).sum(1, keepdim=True).sqrt()
            c = dot / (nrm + 1e-6)
            out.append(F.max_pool2d(c, pool, stride).clamp(0, 1).contiguous().flatten(1).half() if os.environ.get("F16") else
                       F.max_pool2d(c, pool, stride).clamp(0, 1).contiguous().flatten(1))
    return torch.cat(out).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--K", type=int, default=400)
    ap.add_argument("--n", default="40")
    ap.add_argument("--stride", type=int, default=6)
    ap.add_argument("--patches", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--delta", type=float, default=0.2)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--head-epochs", type=int, default=60)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    train = load_split(DATA, "train", progress=False)
    tag = f"wh-e{a.eps}-K{a.K}-P{a.patches}-ep{a.epochs}-d{a.delta}"
    bank = CACHE / f"{tag}.pt"
    t0 = time.time()
    if bank.is_file():
        Z, M = torch.load(bank)
    else:
        p = sample_patches(np.asarray(train.x), a.patches, 0)
        Z, lam = whitening(p[:500_000], a.eps)
        M = learn(p @ Z.T, a.K, 0, a.epochs, delta=a.delta)
        torch.save((Z, M), bank)
        print(f"bank {tag} {time.time() - t0:.0f}s; eig range {lam.min():.2e}..{lam.max():.2e}", file=sys.stderr, flush=True)
    sets = {}
    for name, flip in (("clean", False), ("flip", True)):
        if name == "flip" and not a.flip:
            continue
        f = CACHE / f"{tag}-s{a.stride}-{name}.npy"
        if not f.is_file():
            t1 = time.time()
            np.save(str(f) + ".tmp.npy", features(np.asarray(train.x), Z, M, a.stride, flip=flip))
            os.replace(str(f) + ".tmp.npy", f)
            print(f"features {f.name} {time.time() - t1:.0f}s", file=sys.stderr, flush=True)
        sets[name] = np.load(f, mmap_mode="r")
    tr, va = validation_split(train.y, 0.1, 0)
    Xtr = np.concatenate([np.asarray(s[tr]) for s in sets.values()])
    ytr = np.concatenate([train.y[tr]] * len(sets))
    Xval, yval = np.asarray(sets["clean"][va]), train.y[va]
    for n in map(float, a.n.split(",")):
        t1 = time.time()
        best, ep, hist, _ = train_head(Xtr, ytr, Xval, yval, n, a.head_epochs, dropout=a.dropout)
        row = {"label": a.label or "whiten", "tag": tag, "stride": a.stride, "flip": a.flip, "n": n, "dropout": a.dropout,
               "val": best, "best_epoch": ep, "seconds": round(time.time() - t1)}
        print(json.dumps(row), flush=True)
        with open("/work/scratch/rows.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
