"""Issue 24 screen: head trained with mirrored and shifted copies (features of each), wide shipped bank, subset."""
import json, os, sys, time
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from edgehebb.nnl.model import load_model
from edgehebb.nnl.features import images_to_tensor
from edgehebb.nnl.train import validation_split
from edgehebb.data import load_split

net, _ = load_model(os.environ.get("MODEL", "fig2_left_wide-cifar10"))
data = load_split(os.environ["EDGEHEBB_DATA"], "train", limit=int(os.environ.get("LIMIT", "20000")), progress=False)
labels = np.asarray(data.y)
S = int(os.environ.get("SHIFT", "3"))
COPIES = int(os.environ.get("COPIES", "2"))
rng = np.random.default_rng(0)

def shifted(x, dy, dx):
    p = F.pad(x, [S] * 4, mode="reflect")
    return p[:, :, S + dy:S + dy + 32, S + dx:S + dx + 32]

t0 = time.time()
sets = {"orig": [], "flip": []} | {f"shift{i}": [] for i in range(COPIES)}
with torch.no_grad():
    for lo in range(0, len(labels), 250):
        x = images_to_tensor(data.x[lo:lo + 250])
        sets["orig"].append(net.features(x).half())
        sets["flip"].append(net.features(x.flip(-1).contiguous()).half())
        for i in range(COPIES):
            out = torch.empty_like(sets["orig"][-1])
            for j in range(len(x)):
                dy, dx = rng.integers(-S, S + 1, 2)
                xi = shifted(x[j:j + 1], int(dy), int(dx))
                if rng.random() < 0.5:
                    xi = xi.flip(-1)
                out[j] = net.features(xi.contiguous())[0].half()
            sets[f"shift{i}"].append(out)
print(f"features {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
F_ = {k: torch.cat(v) for k, v in sets.items()}
tr, va = validation_split(labels, 0.1, 0)
y = torch.from_numpy(labels).long()
o = F_["orig"].float()
mu, sd = o[tr].mean(0), o[tr].std(0).clamp_min(1e-12)

def run(keys, epochs=40):
    X = torch.cat([F_[k][tr] for k in keys]).float().sub_(mu).div_(sd)
    Y = torch.cat([y[tr]] * len(keys))
    V = (F_["orig"][va].float() - mu) / sd
    torch.manual_seed(0)
    head = torch.nn.Linear(X.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    bs = 256
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(X) // bs))
    best, curve = 0, []
    for ep in range(epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(ep))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(head(F.dropout(X[idx], 0.5, True)), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        with torch.no_grad():
            acc = (head(V).argmax(1) == y[va]).float().mean().item()
        curve.append(round(acc, 4)); best = max(best, acc)
    return best, curve

for keys in (["orig", "flip"], ["orig", "flip"] + [f"shift{i}" for i in range(COPIES)]):
    best, curve = run(keys)
    print(json.dumps({"+".join(keys): best, "curve": curve}), flush=True)
