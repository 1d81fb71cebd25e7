"""Shadow generator: deterministic per (seed, image index), exact coverage, exact darkening, irregular shapes."""

from __future__ import annotations

import numpy as np
import pytest

from edgehebb.errors import EdgehebbError
from edgehebb.camera.shadow import SWEEP_INTENSITIES, apply_shadow, shadow_masks, shadow_sweep


def test_same_seed_same_masks_different_seed_different_masks():
    a = shadow_masks(20, 32, 32, seed=3)
    assert a.dtype == np.float32 and a.shape == (20, 32, 32)
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert np.array_equal(a, shadow_masks(20, 32, 32, seed=3))
    b = shadow_masks(20, 32, 32, seed=4)
    assert all(not np.array_equal(a[i], b[i]) for i in range(20))


def test_mask_depends_on_image_index_not_on_batch():
    whole = shadow_masks(30, 32, 32, seed=1)
    parts = np.concatenate([shadow_masks(7, 32, 32, seed=1), shadow_masks(23, 32, 32, seed=1, start=7)])
    assert np.array_equal(whole, parts)


@pytest.mark.parametrize("coverage", [0.0, 0.25, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("size", [(32, 32), (17, 23)])
def test_coverage_is_exact_to_one_pixel(coverage, size):
    h, w = size
    frac = shadow_masks(50, h, w, coverage=coverage, seed=0).reshape(50, -1).mean(1)
    # exact count round(coverage * H * W) per image: within half a pixel of the target
    assert np.abs(frac - coverage).max() <= 0.5 / (h * w) + 1e-7


def test_larger_coverage_shadows_a_superset():
    small, large = shadow_masks(10, 32, 32, 0.5, seed=2), shadow_masks(10, 32, 32, 0.8, seed=2)
    assert np.all(large >= small)


def test_shapes_are_irregular_not_rectangles_and_vary_across_images():
    masks = shadow_masks(40, 32, 32, coverage=0.8, seed=0).astype(bool)
    # not one shape repeated: pairwise, masks differ in a good part of the image
    diffs = [(masks[i] != masks[j]).mean() for i in range(10) for j in range(i + 1, 10)]
    assert min(diffs) > 0.02 and np.mean(diffs) > 0.1
    for m in masks:
        lit = ~m
        rows, cols = np.nonzero(lit)
        # the lit part is not an axis-aligned rectangle (or a union of whole rows/cols):
        # it fills well under all of its bounding box
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert lit.sum() < 0.95 * box
    # and the shadow is not always in the same place: every pixel is lit in some image
    assert (~masks).any(axis=0).mean() > 0.9


def test_intensity_applied_exactly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    out = apply_shadow(images, intensity=0.3, coverage=0.8, seed=5)
    assert out.dtype == np.uint8 and out.shape == images.shape
    mask = shadow_masks(12, 32, 32, coverage=0.8, seed=5).astype(bool)
    expected = np.vectorize(lambda p: int(p * 0.3 + 0.5))(images)   # round half up, per value
    assert np.array_equal(out[mask], expected[mask])
    assert np.array_equal(out[~mask], images[~mask])
    assert np.array_equal(apply_shadow(images, intensity=1.0), images)
    # rounding is half up, not to even: 5 * 0.3 = 1.5 -> 2, 15 * 0.3 = 4.5 -> 5, 255 * 0.3 = 76.5 -> 77
    flat = np.array([0, 1, 5, 15, 255], np.uint8).reshape(1, 1, 5, 1).repeat(8, axis=1)
    assert apply_shadow(flat, 0.3, coverage=1.0)[0, 0, :, 0].tolist() == [0, 0, 2, 5, 77]


def test_sweep_covers_the_grid_with_shared_regions():
    images = np.full((4, 16, 16, 3), 200, np.uint8)
    runs = list(shadow_sweep(images, coverages=(0.5, 0.8), seed=1))
    assert [(v, c) for v, c, _ in runs] == [(v, c) for c in (0.5, 0.8) for v in SWEEP_INTENSITIES]
    assert SWEEP_INTENSITIES[0] == 0.1 and SWEEP_INTENSITIES[-1] == 1.0 and len(SWEEP_INTENSITIES) == 10
    for v, c, out in runs:
        assert np.array_equal(out, apply_shadow(images, v, c, seed=1))
        assert np.isclose((out != 200).any(-1).mean(), c if v < 1 else 0.0, atol=1 / 256)


@pytest.mark.parametrize("kw", [{"intensity": -0.1}, {"intensity": 1.5}, {"intensity": float("nan")},
                                {"coverage": 1.2}, {"coverage": -0.01}, {"coverage": "most"}])
def test_bad_intensity_or_coverage_is_a_user_error(kw):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(EdgehebbError, match="intensity|coverage"):
        apply_shadow(images, **kw)
    with pytest.raises(EdgehebbError, match="intensity|coverage"):
        list(shadow_sweep(images, intensities=[kw.get("intensity", 0.5)], coverages=[kw.get("coverage", 0.8)]))


def test_bad_images_are_a_user_error():
    with pytest.raises(EdgehebbError, match="uint8"):
        apply_shadow(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(EdgehebbError, match="uint8"):
        apply_shadow(np.zeros((8, 8, 3), np.uint8))
