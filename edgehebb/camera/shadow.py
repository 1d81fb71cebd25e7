"""Shadowed test images: the paper's robustness experiment (Grinberg, Hopfield & Krotov 2019).

A shadow multiplies the pixels of part of an image by ``intensity`` (the paper: about 80% of the
area, times 0.3). The shadowed region of image ``i`` is drawn as follows:

1. a smooth random field over the image: a sum of six random plane waves with at most 1.5 cycles
   across the image (random direction, frequency, phase and amplitude) plus a linear ramp in a
   random direction;
2. the ``round(coverage * H * W)`` pixels where the field is largest are shadowed.

At 80% coverage the lit remainder is one or a few irregular blobs with smooth, curved borders,
anywhere in the image (the ramp pulls them towards one side), and the shadow edge is sharp like a
cast shadow's: no two images share a shape, none is a rectangle.

Hence the shadowed fraction equals ``coverage`` exactly, up to rounding to whole pixels
(|fraction - coverage| <= 0.5 / (H * W)). The field depends only on ``(seed, i)``: the same test
image always gets the same shadow, whatever the batch it comes in (``start`` gives the index of a
batch's first image). For one image and seed, a larger coverage shadows a superset of the pixels
of a smaller one, and every intensity uses the same region, so sweeps over either give smooth curves.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from edgehebb.errors import EdgehebbError

INTENSITY = 0.3
COVERAGE = 0.8
SWEEP_INTENSITIES = tuple(round(0.1 * i, 1) for i in range(1, 11))   # 0.1, 0.2, ..., 1.0 (1.0 = clean)

_WAVES = 6           # plane waves in the field
_MAX_CYCLES = 1.5    # their highest frequency, in cycles per image side
_RAMP = 1.0          # weight of the linear ramp beside the waves (whose summed amplitude is ~1)
_CHUNK = 256         # images per vectorised batch


def _check_fraction(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:   # also rejects NaN
        raise EdgehebbError(f"shadow {name} must be a number in [0, 1], got {value!r}")
    return v


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EdgehebbError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images


def darken(images: np.ndarray, mask: np.ndarray, intensity: float) -> np.ndarray:
    """Shadowed pixels (``mask`` (N, H, W) bool) times ``intensity``, rounded half up."""
    dark = np.floor(np.arange(256) * intensity + 0.5).astype(np.uint8)   # look-up table per grey level
    return np.where(mask[..., None], dark[images], images)


def _fields(n: int, height: int, width: int, seed: int, start: int) -> np.ndarray:
    """(n, height, width) smooth random fields: low-frequency plane waves plus a tilted ramp.

    Image ``start + i`` draws its parameters from its own generator seeded with (seed, start + i).
    """
    params = np.empty((n, 4 * _WAVES + 1))
    for i in range(n):
        rng = np.random.default_rng([seed, start + i])
        params[i] = np.concatenate([rng.uniform(0, 2 * np.pi, _WAVES),          # wave directions
                                    rng.uniform(0.3, _MAX_CYCLES, _WAVES),      # cycles per image
                                    rng.uniform(0, 2 * np.pi, _WAVES),          # phases
                                    rng.uniform(0.5, 1.0, _WAVES) / _WAVES ** 0.5,  # amplitudes
                                    rng.uniform(0, 2 * np.pi, 1)])              # ramp direction
    angle, cycles, phase, amp = (params[:, k * _WAVES:(k + 1) * _WAVES, None, None] for k in range(4))
    tilt = params[:, -1, None, None]
    y, x = np.mgrid[0:height, 0:width]
    y, x = (y + 0.5) / height, (x + 0.5) / width                 # the image spans [0, 1]^2
    proj = np.cos(angle) * x + np.sin(angle) * y                  # (n, waves, H, W)
    field = (amp * np.cos(2 * np.pi * cycles * proj + phase)).sum(1)
    return field + _RAMP * (np.cos(tilt) * (x - 0.5) + np.sin(tilt) * (y - 0.5))


def shadow_masks(n: int, height: int, width: int, coverage: float = COVERAGE, seed: int = 0,
                 start: int = 0) -> np.ndarray:
    """float32 (n, height, width) masks, 1 = shadowed, for images ``start`` .. ``start + n - 1``."""
    coverage = _check_fraction(coverage, "coverage")
    if n < 0 or height < 1 or width < 1:
        raise EdgehebbError(f"shadow masks need n >= 0 and a positive size, got n={n}, {height}x{width}")
    k = round(coverage * height * width)
    masks = np.zeros((n, height * width), np.float32)
    for lo in range(0, n, _CHUNK):   # chunks bound the (chunk, waves, H, W) temporary
        hi = min(n, lo + _CHUNK)
        field = _fields(hi - lo, height, width, seed, start + lo).reshape(hi - lo, -1)
        # stable sort: ties (measure zero for a continuous field) break the same way every time
        order = np.argsort(-field, axis=1, kind="stable")[:, :k]
        np.put_along_axis(masks[lo:hi], order, 1.0, axis=1)
    return masks.reshape(n, height, width)


def apply_shadow(images: np.ndarray, intensity: float = INTENSITY, coverage: float = COVERAGE, seed: int = 0,
                 start: int = 0) -> np.ndarray:
    """uint8 NHWC ``images`` with the shadowed pixels (all channels) multiplied by ``intensity``.

    Values are rounded half up (``floor(p * intensity + 0.5)``). Returns a new array.
    """
    intensity = _check_fraction(intensity, "intensity")
    images = _check_images(images)
    n, h, w, _ = images.shape
    return darken(images, shadow_masks(n, h, w, coverage, seed, start).astype(bool), intensity)


def shadow_sweep(images: np.ndarray, intensities: Sequence[float] = SWEEP_INTENSITIES,
                 coverages: Sequence[float] = (COVERAGE,), seed: int = 0,
                 start: int = 0) -> Iterator[tuple[float, float, np.ndarray]]:
    """(intensity, coverage, shadowed images) for every pair, coverage-major, for accuracy curves.

    The shadow regions are the same at every intensity for a given coverage, so a curve shows the
    effect of darkening alone; intensity 1.0 returns the clean images.
    """
    coverages = [_check_fraction(c, "coverage") for c in coverages]
    intensities = [_check_fraction(v, "intensity") for v in intensities]
    images = _check_images(images)
    n, h, w, _ = images.shape
    for c in coverages:
        mask = shadow_masks(n, h, w, c, seed, start).astype(bool)   # drawn once per coverage
        for v in intensities:
            yield v, c, darken(images, mask, v)
