"""Cutting W x W x C patches out of images on the fly, and the per-patch preprocessing.

Images stay resident on the device as one uint8 tensor (N, C, H, Wd); a patch is named by one
integer ``index = (image * ny + row) * nx + col`` over the grid of patch positions. Gathering a
minibatch of patches reads ``B * C * W * W`` bytes and never builds the full patch matrix, which for
CIFAR-10 (50,000 images, W=4, stride 1) would be 42 M patches x 48 values.

A patch vector is laid out (C, W, W) row-major, the same order as a ``conv2d`` weight of shape
(K, C, W, W): a filter bank learned here is a convolution weight without any transposition.
"""

from __future__ import annotations

import numpy as np
import torch

from edgehebb.errors import EdgehebbError

PREPROCESS = ("none", "center", "unit", "center-unit")


def patch_grid(height: int, width: int, kernel: int, stride: int) -> tuple[int, int]:
    """Number of patch positions (rows, cols) of a ``kernel`` window moved by ``stride``."""
    if kernel < 1 or stride < 1:
        raise EdgehebbError(f"kernel and stride must be >= 1, got kernel={kernel}, stride={stride}")
    if kernel > height or kernel > width:
        raise EdgehebbError(f"kernel W={kernel} is larger than the images ({height}x{width})")
    return (height - kernel) // stride + 1, (width - kernel) // stride + 1


class PatchSampler:
    """Gathers patches by index from a stack of uint8 images held on one device."""

    def __init__(self, images: torch.Tensor, kernel: int, stride: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise EdgehebbError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()
        n, c, h, w = images.shape
        self.kernel, self.stride = kernel, stride
        self.ny, self.nx = patch_grid(h, w, kernel, stride)
        self.n_patches = n * self.ny * self.nx
        self.dim = c * kernel * kernel
        dev = images.device
        ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(kernel), torch.arange(kernel), indexing="ij")
        # offset of each patch element from the patch's top-left corner in the flat image buffer
        self._offsets = (ch * h * w + i * w + j).reshape(-1).to(dev)
        self._hw, self._w, self._chw = h * w, w, c * h * w

    def corners(self, index: torch.Tensor) -> torch.Tensor:
        """Flat buffer offset of the top-left element of each indexed patch."""
        per_image = self.ny * self.nx
        img, r = index // per_image, index % per_image
        row, col = r // self.nx, r % self.nx
        return img * self._chw + row * self.stride * self._w + col * self.stride

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """float32 patches (B, C*W*W) in [0, 1] for int64 patch indices ``index`` (B,)."""
        flat = self.images.view(-1)
        at = self.corners(index.to(self.images.device))[:, None] + self._offsets[None, :]
        return flat[at].float().div_(255.0)


def preprocess(v: torch.Tensor, mode: str, eps: float = 1e-8) -> torch.Tensor:
    """Per-patch preprocessing before learning.

    ``none``: pixel values in [0, 1] as in Krotov & Hopfield's code. ``center``: subtract each patch's
    mean. ``unit``: scale each patch to unit length (the NNL-CONV patch normalisation).
    ``center-unit``: both. ``eps`` keeps a flat black patch from dividing by zero.

    The mean is the float64 sum divided by N, rounded once to float32: exact for patches cut from
    uint8 images (the sum of at most a few thousand values k/255 fits float64's mantissa), so a flat
    patch centres to exactly zero. A float32 mean is off by rounding noise (~1e-6), which ``unit``
    would blow up into a near-unit random vector that wins units and wastes a filter on it. The
    kernel (cuda/hebbian_step.cu, store_patches) computes the same mean bit for bit.
    """
    if mode == "none":
        return v
    if mode not in PREPROCESS:
        raise EdgehebbError(f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESS)}")
    if mode.startswith("center"):
        v = v - (v.double().sum(dim=1, keepdim=True) / v.shape[1]).to(v.dtype)
    if mode.endswith("unit"):
        v = v / (v.norm(dim=1, keepdim=True) + eps)
    return v


def nchw_copy(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC ``images`` as an NCHW tensor of their own (``images`` may be a read-only memmap)."""
    return torch.tensor(images).permute(0, 3, 1, 2).contiguous()


WHITENING_SAMPLE = 500_000   # patches the whitening matrix is estimated from (a seeded sample)


def whitening_matrix(images: torch.Tensor, kernel: int, stride: int, eps: float, seed: int,
                     count: int = WHITENING_SAMPLE) -> torch.Tensor:
    """Z (N, N), symmetric: ZCA whitening of the patches of uint8 NCHW ``images``, for ``edgehebb learn
    --whiten EPS``. S is the second moment of unit-length patches (no mean is subtracted: Z is linear, so a
    whitened patch scaled to unit length stays blind to a uniform scale of the patch, a shadow's), estimated
    in float64 on a seeded sample of ``count`` patches; Z = U (Lambda + EPS * mean(Lambda))^(-1/2) U^T for
    S = U Lambda U^T. EPS keeps the weakest directions (pixel noise, JPEG blocks) from being blown up:
    0.1 validated best on CIFAR-10, 0.3 (the shipped wide model's) holds up under sensor noise
    (RESULTS.md, issue 24)."""
    if not eps > 0:
        raise EdgehebbError(f"the whitening's regulariser must be > 0, got {eps}")
    sampler = PatchSampler(images, kernel, stride)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 4241)
    index = torch.randperm(sampler.n_patches, generator=gen)[:count]
    s = torch.zeros(sampler.dim, sampler.dim, dtype=torch.float64)
    for lo in range(0, len(index), 50_000):
        v = preprocess(sampler.gather(index[lo:lo + 50_000]), "unit").cpu().double()
        s += v.T @ v
    lam, u = torch.linalg.eigh(s / len(index))
    z = u @ torch.diag((lam + eps * lam.mean()).rsqrt()) @ u.T
    return ((z + z.T) / 2).float()


def whiten(v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """Patches (B, N) times the whitening matrix (symmetric), or ``v`` itself when there is none."""
    return v if z is None else v @ z.to(v.device)


def in_pixels(filters: torch.Tensor, whitening: torch.Tensor | None) -> torch.Tensor:
    """What each unit of a bank responds to in pixels: for a whitened bank (rows m over the whitened patch,
    ``whitening`` the (N, C, W, W) convolution of Z) Z m, shaped (K, C, W, W), since Z is symmetric; the
    ``filters`` themselves without a whitening."""
    if whitening is None:
        return filters
    return (filters.flatten(1) @ whitening.flatten(1).to(filters)).reshape(len(filters), *whitening.shape[1:])


def sample_patches(images: torch.Tensor, kernel: int, stride: int, count: int, mode: str, seed: int,
                   whitening: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` distinct patches of uint8 NCHW ``images``, preprocessed by ``mode`` and scaled to unit
    length: the ``init="patches"`` starting weights (each unit starts on a data point, as k-means
    centroids do, instead of in a random direction that no patch may ever favour).

    Drawn with a CPU generator seeded by ``seed``, so every backend starts from the same rows.
    Patches that preprocess to (near) zero, such as flat ones under centring, are skipped. With a
    ``whitening`` matrix the patches are whitened first, as learning sees them.
    """
    sampler = PatchSampler(images, kernel, stride)
    if count > sampler.n_patches:
        raise EdgehebbError(f"cannot start {count} units on distinct patches: the data has {sampler.n_patches}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 977)
    order = torch.randperm(sampler.n_patches, generator=gen)
    rows, start = [], 0
    while sum(len(r) for r in rows) < count and start < len(order):
        take = order[start:start + 2 * count]
        start += len(take)
        v = preprocess(whiten(sampler.gather(take), whitening), mode)
        norms = v.norm(dim=1)
        rows.append(v[norms > 1e-3] / norms[norms > 1e-3, None])
    picked = torch.cat(rows)[:count]
    if len(picked) < count:
        raise EdgehebbError(f"only {len(picked)} of the data's patches are not flat after {mode!r}; {count} units need more")
    return picked.cpu().float()


def flat_cosines(weights: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of M (K, N) with the flat patch (all values equal).

    Plain unit patches of natural images lie close to the flat patch (CIFAR-10: median cosine 0.97),
    and so do the rows of a bank learned from them (0.8 to 0.99). A bank whose rows sit far from it
    has collapsed: the anti-Hebbian term pushed the units out of the cone of patches.
    """
    w = weights.detach().flatten(1).double()
    return w.sum(dim=1) / (w.norm(dim=1).clamp_min(1e-300) * w.shape[1] ** 0.5)
