"""Issue 24 proxy: how much a whitened K = 1,600 block's features suffer under low light at 6.5 stops, per
regulariser, without training a head on the full data (about 2 minutes a bank on one thread).

A ridge classifier (dual form, two ridge strengths: 0.1 and 1 times the mean diagonal of the Gram matrix)
on the standardised features of N_TRAIN random training images perturbed as the shipped recipe does
(seven camera conditions on half of them), scored on N_TEST random test images clean and under
low-light 6.5 (seed 0). Prints one JSON row per bank directory: the clean and low-light accuracies, the
share kept, and the features' perturbation (mean squared change of the standardised features under
low light over their mean squared spread on clean images).

    EDGEHEBB_DATA=../shared/data/cifar10 PYTHONPATH=. python results/issue24/eps02/probe_eps.py BANK_DIR...
"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
from edgehebb.data import load_split
from edgehebb.io import load_filters, load_whitening
from edgehebb.nnl.spec import spec_from_dict
from edgehebb.nnl.layers import NNLNet
from edgehebb.nnl.features import compute_features
from edgehebb.camera.augment import augment
from edgehebb.camera.conditions import apply_condition

torch.set_num_threads(1)
N_TRAIN, N_TEST = int(os.environ.get("N_TRAIN", 4000)), int(os.environ.get("N_TEST", 1000))
data = os.environ["EDGEHEBB_DATA"]
train = load_split(data, "train", progress=False)
test = load_split(data, "test", progress=False)
rng = np.random.default_rng(0)
ti = rng.choice(len(train.x), N_TRAIN, replace=False)
xtr, ytr = train.x[ti], train.y[ti]
xtr, _ = augment(xtr, "low-light,wb-warm,wb-cool,tint-green,tint-magenta,gamma-high,gamma-low", 0.5, seed=0)
si = rng.choice(len(test.x), N_TEST, replace=False)
xte, yte = test.x[si], test.y[si]
xll = apply_condition(xte, "low-light", 6.5, seed=0)
spec_d = json.load(open(Path(__file__).parents[3] / "models" / "fig2_left_wide.json"))

def feats(net, x):
    return compute_features(net, x, progress=False, threads=1).astype(np.float64)

for bank in sys.argv[1:]:
    t0 = time.time()
    eps = float(json.load(open(f"{bank}/config.json"))["learn"]["whiten"])
    d = dict(spec_d); d["blocks"] = [dict(spec_d["blocks"][0], whiten=eps)]
    spec = spec_from_dict(d, "probe")
    f, _ = load_filters(bank)
    net = NNLNet(spec, [(f.float(), load_whitening(bank).float())]).eval()
    Ftr, Fte, Fll = feats(net, xtr), feats(net, xte), feats(net, xll)
    mu, sd = Ftr.mean(0), Ftr.std(0) + 1e-6
    Ztr, Zte, Zll = (Ftr - mu) / sd, (Fte - mu) / sd, (Fll - mu) / sd
    Y = np.eye(10)[ytr] - 0.1
    K = Ztr @ Ztr.T
    row = {"bank": bank, "whiten": eps}
    for lam_frac in (0.1, 1.0):
        lam = lam_frac * np.trace(K) / len(K)
        a = np.linalg.solve(K + lam * np.eye(len(K)), Y)
        acc = lambda Z: float(((Z @ Ztr.T @ a).argmax(1) == yte).mean())
        c, l = acc(Zte), acc(Zll)
        row[f"ridge{lam_frac}"] = {"clean": c, "low_light": l, "keep": round(l / c, 4)}
    row["perturbation"] = float(((Zll - Zte) ** 2).sum(1).mean() / ((Zte - Zte.mean(0)) ** 2).sum(1).mean())
    row["seconds"] = round(time.time() - t0)
    print(json.dumps(row), flush=True)
