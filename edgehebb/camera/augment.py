"""Train-time augmentation with the camera conditions of :mod:`edgehebb.camera.conditions` (``edgehebb train
--augment``): the same physical models and severities the evaluation sweeps, drawn per image."""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from edgehebb.camera.conditions import apply_condition, get, select
from edgehebb.errors import EdgehebbError


def augment(images: np.ndarray, names: str | Sequence[str], fraction: float = 0.5, seed: int = 0,
            start: int = 0) -> tuple[np.ndarray, list[tuple[str, float] | None]]:
    """Train-time augmentation with the same conditions: each image, with probability ``fraction``, under
    one of ``names`` at one of that condition's default non-zero severities, all drawn uniformly.

    Deterministic for a seed, and image ``start + i`` gets the same draw and the same noise whatever
    batch it comes in (as :func:`apply_condition`). Returns the images and, per image, the
    ``(condition, severity)`` applied or None.
    """
    chosen = select(names)
    if not 0.0 <= fraction <= 1.0:
        raise EdgehebbError(f"augmentation fraction must be in [0, 1], got {fraction!r}")
    images = np.asarray(images)
    out, applied = np.array(images), []
    for i in range(len(images)):
        rng = np.random.default_rng((seed, zlib.crc32(b"augment"), start + i))
        if rng.random() >= fraction:
            applied.append(None)
            continue
        name = chosen[rng.integers(len(chosen))]
        levels = [s for s in get(name).sweep if s > 0]
        severity = float(levels[rng.integers(len(levels))])
        out[i:i + 1] = apply_condition(images[i:i + 1], name, severity, seed=seed, start=start + i)
        applied.append((name, severity))
    return out, applied
