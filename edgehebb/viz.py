"""Pictures of filter banks (the paper's Fig. 1) and the colour-vs-orientation statistic.

Each filter is shown in RGB, scaled to its own [min, max]. Units are ordered by their colour
fraction, so the unoriented colour units ("blob" cells) stand apart from the black-and-white,
orientation-selective ones ("interblob" cells).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from edgehebb.io import save_figure


def filter_stats(filters: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-unit colour fraction and orientation selectivity of a (K, C, W, W) bank.

    colour: share of the filter's energy in colour-opponent directions (pixel minus its mean over
    channels), 0 for a grey filter. orientation: coherence of the luminance gradient's structure
    tensor, (l1 - l2) / (l1 + l2), weighted by the share of energy in luminance edges, so a flat
    filter scores 0 and an oriented grey edge scores near 1. Both are taken on the filter minus its
    mean (its component along the flat grey patch, which has neither colour nor orientation, as in
    the picture): a filter learned on plain, uncentred patches carries a large one (CIFAR-10: cosine
    0.8-0.99 with the flat patch) that would otherwise classify nearly every unit as grey.
    """
    f = filters.detach().double().cpu()
    f = f - f.mean(dim=(1, 2, 3), keepdim=True)
    energy = f.pow(2).sum(dim=(1, 2, 3)).clamp_min(1e-12)
    colour = (f - f.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2, 3)) / energy
    lum = f.mean(dim=1)
    gy, gx = lum[:, 1:, :-1] - lum[:, :-1, :-1], lum[:, :-1, 1:] - lum[:, :-1, :-1]
    jxx, jyy, jxy = gx.pow(2).sum((1, 2)), gy.pow(2).sum((1, 2)), (gx * gy).sum((1, 2))
    coherence = torch.sqrt((jxx - jyy).pow(2) + 4 * jxy.pow(2)) / (jxx + jyy).clamp_min(1e-12)
    spatial = (lum - lum.mean(dim=(1, 2), keepdim=True)).pow(2).sum((1, 2)) * f.shape[1] / energy
    return {"colour": colour.numpy(), "orientation": (coherence * spatial).numpy()}


def colour_orientation_summary(filters: torch.Tensor, colour_threshold: float = 0.3) -> dict:
    """The blob/interblob observation as numbers: colour units should be the unoriented ones.

    A value that is undefined (no colour units, a constant statistic) is None, so the JSON files that
    carry it stay strict JSON (no bare NaN).
    """
    s = filter_stats(filters)
    is_colour = s["colour"] > colour_threshold
    spread = len(s["colour"]) > 1 and s["colour"].std() > 0 and s["orientation"].std() > 0
    corr = float(np.corrcoef(s["colour"], s["orientation"])[0, 1]) if spread else None
    mean = lambda a: float(a.mean()) if a.size else None  # noqa: E731
    return {
        "colour_units": int(is_colour.sum()),
        "bw_units": int((~is_colour).sum()),
        "colour_threshold": colour_threshold,
        "orientation_of_colour_units": mean(s["orientation"][is_colour]),
        "orientation_of_bw_units": mean(s["orientation"][~is_colour]),
        "corr_colour_orientation": corr,
    }


def filter_mosaic(filters: torch.Tensor, zoom: int = 8, gap: int = 1) -> np.ndarray:
    """uint8 RGB mosaic of a (K, C, W, W) bank, colour units first, each filter scaled to its range."""
    f = filters.detach().float().cpu()
    order = np.argsort(-filter_stats(f)["colour"], kind="stable")
    k, c, w, _ = f.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    cell = w * zoom + gap
    out = np.full((rows * cell + gap, cols * cell + gap, 3), 255, np.uint8)
    for slot, unit in enumerate(order):
        img = f[unit].permute(1, 2, 0).numpy()  # (W, W, C)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        if c == 1:
            img = np.repeat(img, 3, axis=2)
        img = np.kron(img[:, :, :3], np.ones((zoom, zoom, 1)))
        r, q = divmod(slot, cols)
        out[gap + r * cell: gap + r * cell + w * zoom, gap + q * cell: gap + q * cell + w * zoom] = (img * 255).round()
    return out


def save_filter_png(filters: torch.Tensor, path: str | os.PathLike, title: str | None = None) -> None:
    """Write the mosaic (with an optional title) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mosaic = filter_mosaic(filters)
    h, w, _ = mosaic.shape
    fig = plt.figure(figsize=(w / 100, h / 100 + (0.4 if title else 0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, h / (h + (40 if title else 0))))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    save_figure(fig, path, dpi=100)
