"""Test accuracy on clean and shadowed images, per class, and error-vs-shadow-intensity curves.

The shadowed set is the paper's construction (:mod:`edgehebb.shadow`): 80% of every image's area
times 0.3, regions seeded by image index, so every model and backend sees the same shadows.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.features import BATCH, images_to_tensor
from edgehebb.nnl import _Net
from edgehebb.shadow import COVERAGE, INTENSITY, SWEEP_INTENSITIES, darken, shadow_masks


@torch.no_grad()
def predict(net: _Net, images: np.ndarray, *, device: str | torch.device = "cpu", batch: int = BATCH) -> np.ndarray:
    """Predicted class ids of uint8 NHWC ``images``."""
    net = net.to(device).eval()
    return np.concatenate([net(images_to_tensor(images[lo:lo + batch], device)).argmax(1).cpu().numpy()
                           for lo in range(0, len(images), batch)])


def accuracy_report(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """{"accuracy", "error", "per_class": {name: accuracy}} (fractions in [0, 1])."""
    acc = float((pred == labels).mean())
    per_class = {name: float((pred[labels == c] == c).mean()) for c, name in enumerate(classes) if (labels == c).any()}
    return {"accuracy": acc, "error": 1.0 - acc, "images": int(len(labels)), "per_class": per_class}


def per_class_table(result: dict) -> str:
    """The per-class figures of :func:`evaluate` as text: one row per class, clean and shadowed accuracy."""
    clean, shadowed = result["clean"]["per_class"], result["shadowed"]["per_class"]
    width = max(len("class"), *(len(name) for name in clean))
    rows = [f"  {'class':<{width}}  {'clean':>7}  {'shadowed':>8}"]
    rows += [f"  {name:<{width}}  {acc:>7.1%}  {shadowed.get(name, float('nan')):>8.1%}" for name, acc in clean.items()]
    return "\n".join(rows)


def check_classes(model_classes: Sequence[str], test: ImageSet) -> None:
    if list(model_classes) != list(test.classes):
        raise EdgehebbError(f"the model's classes {list(model_classes)} differ from those of {test.source} "
                            f"{list(test.classes)}")


def evaluate(net: _Net, test: ImageSet, classes: Sequence[str], *, intensity: float = INTENSITY,
             coverage: float = COVERAGE, seed: int = 0, sweep: Sequence[float] | None = SWEEP_INTENSITIES,
             device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Clean and shadowed accuracy (per class) and, with ``sweep``, error at each shadow intensity."""
    from tqdm import tqdm

    check_classes(classes, test)
    n, h, w, _ = test.x.shape
    mask = shadow_masks(n, h, w, coverage, seed).astype(bool)   # one region per image for all intensities

    def at(v: float) -> np.ndarray:
        return predict(net, test.x if v == 1.0 else darken(test.x, mask, v), device=device)

    levels = sorted({1.0, intensity, *(sweep or ())})
    preds = {v: at(v) for v in tqdm(levels, desc="shadow levels", disable=not progress, leave=False)}
    result = {"clean": accuracy_report(preds[1.0], test.y, classes),
              "shadowed": {**accuracy_report(preds[intensity], test.y, classes),
                           "intensity": intensity, "coverage": coverage, "seed": seed},
              "data": {"source": test.source, "images": len(test)}}
    if sweep:
        result["sweep"] = [{"intensity": v, "coverage": coverage, "error": float((preds[v] != test.y).mean())}
                           for v in levels if v in set(sweep) | {1.0}]
    return result


def save_sweep_png(results: dict[str, dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Test error vs shadow intensity, one line per model (``results``: label -> :func:`evaluate` output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgehebb.io import save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, r in results.items():
        if "sweep" not in r:
            raise EdgehebbError(f"{label}: no intensity sweep to plot (evaluate with a sweep)")
        xs = [p["intensity"] for p in r["sweep"]]
        ax.plot(xs, [100 * p["error"] for p in r["sweep"]], marker="o", label=label)
    ax.set_xlabel("shadow intensity (pixel multiplier; 1 = no shadow)")
    ax.set_ylabel("test error (%)")
    cov = next(iter(results.values()))["shadowed"]["coverage"]
    ax.set_title(title or f"error vs shadow intensity ({cov:.0%} of each image shadowed)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
