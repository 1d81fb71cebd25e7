"""A small linear probe: how useful a filter bank is as frozen features, in seconds on a CPU.

Features: the NNL-CONV response of every filter at every position (cosine between the unit
filter and the unit-normalised patch, ReLU, power n), max-pooled to a ``grid`` x ``grid`` map.
Classifier: ridge regression onto one-hot labels, solved in closed form, so the probe has no
optimiser settings or randomness of its own. Used to compare filter banks (learned vs random,
torch vs pycuda backend); the trained NNL-CONV classifier of ``edgehebb train`` is the real model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def probe_features(images: np.ndarray, filters: torch.Tensor, power: float = 10.0, grid: int = 2,
                   center: bool = False, batch: int = 500, eps: float = 1e-8) -> torch.Tensor:
    """(N, K * grid * grid) float64 features of uint8 NHWC ``images`` under a (K, C, W, W) bank.

    ``center`` subtracts each patch's mean before normalising it, matching filters learned with
    ``--preprocess center-unit``; the default is the paper's plain norm (``--preprocess unit``). float64 because cos^40 of a weak response underflows float32.
    """
    w = filters.double()
    w = w / w.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None, None]
    ones = torch.ones(1, *w.shape[1:], dtype=torch.float64)
    n = ones.numel()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).double() / 255.0
        # in place: at K=400 each (batch, K, H', W') float64 map is 1.3 GB for 500 CIFAR images
        dot, sq = F.conv2d(x, w), F.conv2d(x * x, ones)
        if center:  # (w . (v - mean)) and |v - mean|^2 from the patch sums, without cutting patches
            total = F.conv2d(x, ones)
            dot.sub_(total / n * w.flatten(1).sum(1)[None, :, None, None])
            sq.sub_(total * total / n)
        cos = dot.div_(sq.clamp_min_(0).sqrt_().add_(eps))
        out.append(F.adaptive_max_pool2d(cos, grid).clamp_min(0).pow(power).flatten(1))
    return torch.cat(out)


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                filters: torch.Tensor, ridge: float = 1e-2, **feature_kw) -> float:
    """Test accuracy of a ridge-regression classifier on the bank's features."""
    ftr = probe_features(train_x, filters, **feature_kw).double()
    fte = probe_features(test_x, filters, **feature_kw).double()
    # Standardise each feature; one that (almost) never fires carries no signal, and dividing by
    # its tiny spread would turn rounding noise into huge values, so it is zeroed instead.
    mean, std = ftr.mean(0), ftr.std(0)
    alive = std > 1e-6 * std.max().clamp_min(1e-300)
    scale = torch.where(alive, 1.0 / std.clamp_min(1e-300), torch.zeros_like(std))
    ftr, fte = (ftr - mean) * scale, (fte - mean) * scale
    ftr = torch.cat([ftr, torch.ones(len(ftr), 1, dtype=ftr.dtype)], 1)
    fte = torch.cat([fte, torch.ones(len(fte), 1, dtype=fte.dtype)], 1)
    y = F.one_hot(torch.from_numpy(np.asarray(train_y)).long()).double()
    gram = ftr.T @ ftr + ridge * len(ftr) * torch.eye(ftr.shape[1], dtype=ftr.dtype)
    coef = torch.linalg.solve(gram, ftr.T @ y)
    pred = (fte @ coef).argmax(1).numpy()
    return float((pred == np.asarray(test_y)).mean())
