"""Issue 24 screen: pooling of the wide block (shipped bank, eps 0.3): max vs average pooling, on a subset.
Head: standardised features, dropout 0.5, Adam 1e-3 cosine over 40 epochs, best epoch on validation."""
import json, os, sys, time
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from edgehebb.nnl.model import load_model
from edgehebb.nnl.layers import colour_normalise
from edgehebb.nnl.features import images_to_tensor
from edgehebb.nnl.train import validation_split
from edgehebb.data import load_split

MODEL = os.environ.get("MODEL", "fig2_left_wide-cifar10")
LIMIT = int(os.environ.get("LIMIT", "20000"))
net, _ = load_model(MODEL)
blk = net.blocks[0]
data = load_split(os.environ["EDGEHEBB_DATA"], "train", limit=LIMIT, progress=False)
labels = np.asarray(data.y)
VARIANTS = {  # name: (power, pooling)
    "max11/6 n5": (5, lambda r: F.max_pool2d(r, 11, 6)),
    "avg11/6 n5": (5, lambda r: F.avg_pool2d(r, 11, 6)),
    "avg11/6 n2": (2, lambda r: F.avg_pool2d(r, 11, 6)),
    "avg11/6 n1": (1, lambda r: F.avg_pool2d(r, 11, 6)),
    "avg15/14 (2x2) n2": (2, lambda r: F.avg_pool2d(r, 15, 14)),
    "avg7/4 (6x6) n2": (2, lambda r: F.avg_pool2d(r, 9, 4)),
}
only = os.environ.get("ONLY")
if only:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in only.split(";")}
feats = {k: [] for k in VARIANTS}
t0 = time.time()
with torch.no_grad():
    for lo in range(0, len(labels), 250):
        x = colour_normalise(images_to_tensor(data.x[lo:lo + 250]), net.spec.colour_norm)
        c = blk.cosines(x).clamp(max=1.0).relu_()
        for k, (n, pool) in VARIANTS.items():
            feats[k].append(pool(c.pow(n)).flatten(1).half())
print(f"features {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
tr, va = validation_split(labels, 0.1, 0)
y = torch.from_numpy(labels).long()
out = {}
for k in VARIANTS:
    X = torch.cat(feats[k]).float()
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-12)
    X = ((X - mu) / sd)
    torch.manual_seed(0)
    head = torch.nn.Linear(X.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    epochs, bs = 40, 256
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(tr) // bs))
    best = 0
    for ep in range(epochs):
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=torch.Generator().manual_seed(ep))]
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(head(F.dropout(X[idx], 0.5, True)), y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        with torch.no_grad():
            acc = (head(X[va]).argmax(1) == y[va]).float().mean().item()
        best = max(best, acc)
    out[k] = {"val": best, "dim": X.shape[1]}
    print(json.dumps({k: out[k]}), flush=True)
    del X
