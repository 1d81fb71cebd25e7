"""Test accuracy on clean and shadowed images, per class, and error-vs-shadow-intensity curves;
accuracy against severity under every camera condition (:func:`evaluate_conditions`).

The shadowed set is the paper's construction (:mod:`edgehebb.camera.shadow`): 80% of every image's area
times 0.3, regions seeded by image index, so every model and backend sees the same shadows. The
camera conditions (:mod:`edgehebb.camera.conditions`) are seeded the same way.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch

from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.nnl.features import BATCH, images_to_tensor
from edgehebb.nnl.layers import Net
from edgehebb.camera.shadow import COVERAGE, INTENSITY, SWEEP_INTENSITIES, darken, shadow_masks


@torch.no_grad()
def predict(net: Net, images: np.ndarray, *, device: str | torch.device = "cpu", batch: int = BATCH) -> np.ndarray:
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


def evaluate(net: Net, test: ImageSet, classes: Sequence[str], *, intensity: float = INTENSITY,
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


def evaluate_conditions(models: Mapping[str, tuple[Net, Sequence[str]] | str | os.PathLike], test: ImageSet,
                        conditions: str | Sequence[str] | None = None, *,
                        sweeps: Mapping[str, Sequence[float]] | None = None, seed: int = 0, per_class: bool = False,
                        device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Accuracy of each model under each camera condition at each severity, as a JSON-ready dict.

    ``models``: label -> (network, class names), or label -> a model directory or shipped model name.
    ``conditions``: names, a comma-separated string or "all" (None: all); ``sweeps`` replaces the
    default severities of some of them. Each level's images are made once and shared by every model;
    severity 0 is the clean set for every condition (the identity), evaluated once.

    Returns ``{"data", "seed", "conditions": {name: {unit, model, params, max_severity, severities,
    levels}}, "models": {label: {"clean": {accuracy, error, images, per_class}, "conditions": {name:
    {"levels": [{severity, accuracy[, per_class]}], "halved_at"}}}}}``. ``halved_at`` is the severity
    at which accuracy falls to half the clean accuracy (interpolated; null if not within the sweep).
    """
    from tqdm import tqdm

    from edgehebb.camera import conditions as cond
    from edgehebb.nnl.model import load_model

    levels = cond.plan(conditions, sweeps)
    names = list(levels)
    nets = {}
    for label, m in models.items():
        if isinstance(m, (str, os.PathLike)):
            net, config = load_model(m, device)
            m = (net, config["classes"])
        check_classes(m[1], test)
        nets[label] = m

    def report(pred: np.ndarray, classes: Sequence[str]) -> dict:
        r = accuracy_report(pred, test.y, classes)
        return {"accuracy": r["accuracy"], **({"per_class": r["per_class"]} if per_class else {})}

    todo = [(n, s) for n in names for s in levels[n] if s != 0.0]
    clean = {label: predict(net, test.x, device=device) for label, (net, _) in nets.items()}
    out = {label: {"clean": accuracy_report(clean[label], test.y, classes), "conditions": {}}
           for label, (_, classes) in nets.items()}
    acc = {(label, n, 0.0): report(clean[label], nets[label][1]) for label in nets for n in names}
    with tqdm(todo, desc="camera conditions", unit="level", disable=not progress) as bar:
        for n, s in bar:
            bar.set_postfix_str(f"{n} {s:g}")
            images = cond.apply_condition(test.x, n, s, seed)
            for label, (net, classes) in nets.items():
                acc[label, n, s] = report(predict(net, images, device=device), classes)
    for label in nets:
        for n in names:
            rows = [{"severity": s, **acc[label, n, s]} for s in levels[n]]
            halved = cond.halving_severity(levels[n], [r["accuracy"] for r in rows], out[label]["clean"]["accuracy"])
            out[label]["conditions"][n] = {"levels": rows, "halved_at": halved}
    described = {n: {**cond.get(n).describe(), "severities": list(levels[n]),
                     "levels": [{"severity": s, **cond.get(n).level(s)} for s in levels[n]]} for n in names}
    return {"data": {"source": test.source, "images": len(test)}, "seed": seed, "conditions": described,
            "models": out}


def conditions_table(result: dict, label: str) -> str:
    """One model's :func:`evaluate_conditions` figures as text: a line per condition, accuracy per severity."""
    r = result["models"][label]
    width = max(len(n) for n in r["conditions"])
    rows = [f"  {'clean':<{width}}  {r['clean']['accuracy']:.1%}"]
    for n, c in r["conditions"].items():
        levels = "  ".join(f"{lv['severity']:g}: {lv['accuracy']:.1%}" for lv in c["levels"][1:])
        halved = "not halved" if c["halved_at"] is None else f"halved at {c['halved_at']:.3g}"
        rows.append(f"  {n:<{width}}  {levels}  ({halved}; {result['conditions'][n]['unit']})")
    return "\n".join(rows)


def save_conditions_png(result: dict, path: str | os.PathLike, title: str | None = None) -> None:
    """Accuracy against severity, one panel per condition, one line per model (:func:`evaluate_conditions` output).

    A dotted line in each model's colour marks half its clean accuracy: where a curve crosses it is ``halved_at``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgehebb.io import save_figure

    names = list(result["conditions"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.6), dpi=80, squeeze=False)
    top = 100 * max(m["clean"]["accuracy"] for m in result["models"].values())
    for ax, n in zip(axes.flat, names):
        for label, m in result["models"].items():
            lv = m["conditions"][n]["levels"]
            line, = ax.plot([p["severity"] for p in lv], [100 * p["accuracy"] for p in lv], marker="o", ms=2.5,
                            lw=1.2, label=label)
            ax.axhline(50 * m["clean"]["accuracy"], color=line.get_color(), ls=":", lw=0.8)
        ax.set_title(n, fontsize=8)
        ax.set_xlabel(result["conditions"][n]["unit"], fontsize=6)
        ax.set_ylim(0, min(100, 10 * (top // 10 + 1)))
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=7, frameon=False)
    fig.suptitle(title or f"accuracy under camera conditions ({result['data']['images']} test images; "
                          f"dotted: half the clean accuracy)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
