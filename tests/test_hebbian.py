"""The rule and the patch sampler against plain transcriptions of their definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgehebb.errors import EdgehebbError
from edgehebb.learn.hebbian import check_rule, rank_update
from edgehebb.learn.patches import PatchSampler, patch_grid, preprocess
from tests.conftest import assert_close


def numpy_step(M, v, eps, p, delta, m, rank_by="current"):
    """Krotov & Hopfield's update written out in float64 numpy, one patch at a time."""
    M = M.astype(np.float64)
    K = M.shape[0]
    ds = np.zeros_like(M)
    xx = np.zeros(K)
    # cosine: rank by h / ||M_mu||_p^(p-1), which is h for rows of unit p-norm
    rank_scale = (np.abs(M) ** p).sum(1) ** ((p - 1) / p) if rank_by == "cosine" else np.ones(K)
    for a in range(v.shape[0]):
        h = (np.sign(M) * np.abs(M) ** (p - 1)) @ v[a]
        order = np.argsort(-h / rank_scale, kind="stable")
        g = np.zeros(K)
        g[order[0]] = 1.0
        g[order[m - 1]] = -delta
        ds += np.outer(g, v[a])
        xx += g * h
    ds -= xx[:, None] * M
    return M + eps * ds / max(np.abs(ds).max(), 1e-30)


@pytest.mark.parametrize("p,m,delta", [(2.0, 2, 0.4), (3.0, 3, 0.2), (2.0, 7, 1.0)])
def test_step_matches_numpy_transcription(p, m, delta):
    rng = np.random.default_rng(3)
    M = rng.normal(size=(7, 12)).astype(np.float32)
    v = rng.uniform(-1, 1, size=(11, 12)).astype(np.float32)
    expected = numpy_step(M, v.astype(np.float64), 0.05, p, delta, m)
    Mt = torch.from_numpy(M.copy())
    step = rank_update(Mt, torch.from_numpy(v), 0.05, p, delta, m)
    # float32 currents against float64: the update's entries agree to float32 rounding
    assert_close(Mt, expected, rtol=1e-5, atol=1e-6, what="M after one step")
    h = v.astype(np.float64) @ (np.sign(M) * np.abs(M) ** (p - 1)).T
    assert step.winners.tolist() == h.argmax(1).tolist()
    assert step.ranked.tolist() == np.argsort(-h, 1)[:, m - 1].tolist()


@pytest.mark.parametrize("p,m", [(2.0, 2), (3.0, 3)])
def test_cosine_ranking_matches_numpy_transcription(p, m):
    rng = np.random.default_rng(5)
    M = (rng.normal(size=(9, 12)) * rng.uniform(0.5, 3, size=(9, 1))).astype(np.float32)   # unequal row norms
    v = rng.uniform(-1, 1, size=(13, 12)).astype(np.float32)
    expected = numpy_step(M, v.astype(np.float64), 0.05, p, 0.3, m, rank_by="cosine")
    Mt = torch.from_numpy(M.copy())
    rank_update(Mt, torch.from_numpy(v), 0.05, p, 0.3, m, rank_by="cosine")
    assert_close(Mt, expected, rtol=1e-5, atol=1e-6, what="M after one cosine-ranked step")
    assert not np.allclose(expected, numpy_step(M, v.astype(np.float64), 0.05, p, 0.3, m), atol=1e-3)


def test_cosine_ranking_ignores_a_row_s_norm():
    # the patch is closest in angle to unit 0, but unit 1 is four times longer: the current picks
    # unit 1, the cosine picks unit 0 (what the rule converges to, with unit rows)
    M = torch.tensor([[1.0, 0.1], [0.0, 4.0]])
    v = torch.tensor([[1.0, 0.5]])
    assert rank_update(M.clone(), v, 0.1, rank_by="current").winners.item() == 1
    assert rank_update(M.clone(), v, 0.1, rank_by="cosine").winners.item() == 0
    with pytest.raises(EdgehebbError, match="unknown ranking 'angle'"):
        check_rule(4, 2, 2.0, 0.4, "angle")


def test_zero_patches_do_not_divide_by_zero():
    M = torch.randn(4, 6)
    before = M.clone()
    rank_update(M, torch.zeros(5, 6), 0.1)
    assert torch.isfinite(M).all()
    # with v = 0 the currents are 0, so ds = 0 and M must not move
    assert torch.equal(M, before)


@pytest.mark.parametrize("kwargs,message", [
    (dict(filters=1, rank=2, power=2, delta=0.4), "at least 2 filters"),
    (dict(filters=5, rank=6, power=2, delta=0.4), "rank m"),
    (dict(filters=5, rank=2, power=0.5, delta=0.4), "power"),
    (dict(filters=5, rank=2, power=2, delta=-1), "delta"),
])
def test_rule_rejects_bad_settings(kwargs, message):
    with pytest.raises(EdgehebbError, match=message):
        check_rule(**kwargs)


@pytest.mark.parametrize("kernel,stride", [(4, 1), (3, 2), (5, 3)])
def test_sampler_matches_unfold(kernel, stride):
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (3, 2, 11, 13), dtype=np.uint8))
    sampler = PatchSampler(imgs, kernel, stride)
    # unfold gives (N, C*W*W, L) with the same (C, W, W) element order and row-major positions
    ref = F.unfold(imgs.float() / 255, kernel, stride=stride).permute(0, 2, 1).reshape(-1, 2 * kernel * kernel)
    assert sampler.n_patches == ref.shape[0]
    idx = torch.randperm(sampler.n_patches)
    assert torch.equal(sampler.gather(idx), ref[idx])


def test_patch_grid_rejects_kernel_larger_than_image():
    with pytest.raises(EdgehebbError, match="larger than the images"):
        patch_grid(8, 8, 9, 1)


def test_preprocess_modes():
    v = torch.rand(20, 12) + 0.1
    c = preprocess(v, "center")
    assert_close(c.mean(1), torch.zeros(20), rtol=0, atol=1e-6, what="centred means")
    assert_close(preprocess(v, "unit").norm(dim=1), torch.ones(20), rtol=0, atol=1e-6, what="unit norms")
    cu = preprocess(v, "center-unit")
    assert_close(cu.norm(dim=1), torch.ones(20), rtol=0, atol=1e-5, what="centred unit norms")
    assert torch.equal(preprocess(v, "none"), v)
    assert torch.isfinite(preprocess(torch.zeros(2, 12), "center-unit")).all()
    with pytest.raises(EdgehebbError, match="unknown preprocessing"):
        preprocess(v, "whiten")


@pytest.mark.parametrize("kernel", [3, 4, 5, 6, 8])
def test_flat_patches_centre_to_exactly_zero_at_every_grey_level(kernel):
    # A float32 mean leaves ~1e-6 of rounding noise in a flat patch, and the unit step blew that up
    # into a near-unit random vector for about a third of the grey levels (saturated sky, walls).
    levels = torch.arange(256, dtype=torch.uint8)
    images = levels[:, None, None, None].expand(256, 3, kernel, kernel).contiguous()
    v = PatchSampler(images, kernel, 1).gather(torch.arange(256))
    for mode in ("center", "center-unit"):
        assert torch.equal(preprocess(v, mode), torch.zeros_like(v)), mode
    # one level off in one pixel is a real (tiny) contrast, and stays one
    images[:, 0, 0, 0] = levels.clamp_min(1) - 1
    v = PatchSampler(images, kernel, 1).gather(torch.arange(1, 256))
    assert_close(preprocess(v, "center-unit").norm(dim=1), torch.ones(255), rtol=0, atol=1e-5, what="norms")


def test_cosine_ranking_refuses_long_standard_normal_rows_with_an_anti_hebbian_term():
    from edgehebb.learn.loop import LearnConfig

    with pytest.raises(EdgehebbError, match="needs --init patches"):
        LearnConfig(init="normal", rank_by="cosine", delta=0.2).check((32, 32, 3))
    LearnConfig(init="normal", rank_by="cosine", delta=0.0).check((32, 32, 3))     # no term that lengthens rows
    LearnConfig(init="normal", rank_by="current", delta=0.4).check((32, 32, 3))    # the paper's rule
