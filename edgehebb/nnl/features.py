"""Frozen features: run a network's blocks over uint8 images in batches, once, and cache the result.

Training a head on frozen NNL-CONV features should take seconds per epoch on a CPU, so the blocks
run over the training images once and the (N, D) float32 matrix is kept in
``$EDGEHEBB_CACHE/features`` (default ``~/.cache/edgehebb/features``) under a key made of the
images' bytes, the blocks' weights and the spec: any change to either gives a new entry, and a
cached matrix is memory-mapped instead of recomputed (a freshly computed one too, once written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgehebb.errors import EdgehebbError
from edgehebb.io import atomic_write
from edgehebb.nnl.model import model_kind
from edgehebb.nnl import layers as nnl
from edgehebb.nnl.layers import Net
from edgehebb.nnl.spec import feature_dim
from edgehebb.threads import ThreadTuner

BATCH = 250   # images per forward pass: the fig. 2-middle blocks' maps take ~0.9 GB at this size


def images_to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 NHWC (numpy) -> float32 NCHW in [0, 1] on ``device``; the copy to the device stays uint8."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EdgehebbError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    t = torch.from_numpy(np.array(images)).to(device)   # a copy: images may be a read-only memmap
    return t.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def compute_features(net: Net, images: np.ndarray, *, device: str | torch.device = "cpu", batch: int = BATCH,
                     progress: bool = True, desc: str = "features", threads: int | None = None) -> np.ndarray:
    """(N, feature_dim) float32 numpy: ``net.features`` of uint8 NHWC ``images``.

    On the CPU the thread count is measured batch by batch (:mod:`edgehebb.threads`; ``threads`` or
    ``--threads`` fixes it): the features are bitwise the same whatever it is.
    """
    net = net.to(device).eval()
    if len(images) == 0:
        raise EdgehebbError("no images to compute features of")
    # Filled in place: gathering batches and concatenating them would hold the matrix twice (2 x 5 GB
    # for the wide model's 50,000 images).
    out = None
    with ThreadTuner(threads) if torch.device(device).type == "cpu" else contextlib.nullcontext() as tuner:
        for lo in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=not progress, leave=False):
            if tuner is not None:
                tuner.choose()
            t0 = time.perf_counter()
            f = net.features(images_to_tensor(images[lo:lo + batch], device)).cpu().numpy()
            if out is None:
                out = np.empty((len(images), f.shape[1]), np.float32)
            out[lo:lo + len(f)] = f
            if tuner is not None:
                tuner.record(time.perf_counter() - t0, len(f))
    return out


def cache_dir() -> Path:
    base = os.environ.get("EDGEHEBB_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "edgehebb") / "features"


def features_key(net: Net, images: np.ndarray) -> str:
    """Hex digest of the images, the blocks' tensors (not the head's), the spec less its head, the kind of
    network (a CONV twin's power and patch norm change its features, not its tensors) and the layer's code
    (edgehebb/nnl/layers.py: a change to its arithmetic must not reuse features computed before it)."""
    h = hashlib.sha256()
    h.update(Path(nnl.__file__).read_bytes())
    h.update(json.dumps(net.spec.without_head(), sort_keys=True).encode())   # heads share features
    h.update(json.dumps(model_kind(net)).encode())
    h.update(json.dumps([list(images.shape), str(images.dtype)]).encode())
    h.update(np.ascontiguousarray(images).data)
    for name, t in sorted(net.blocks.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_features(net: Net, images: np.ndarray, *, device: str | torch.device = "cpu",
                    cache: str | os.PathLike | None = None, progress: bool = True,
                    desc: str = "features") -> np.ndarray:
    """:func:`compute_features`, read from / written to the cache folder (``cache=False``-like: pass ``""``)."""
    if cache == "":
        return compute_features(net, images, device=device, progress=progress, desc=desc)
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"{features_key(net, images)}.npy"
    if path.is_file():
        try:
            feats = np.load(path, mmap_mode="r")
            if feats.shape == (len(images), feature_dim(net.spec)) and feats.dtype == np.float32:
                return feats
        except (ValueError, OSError, EOFError):   # EOFError: an empty file
            pass   # a damaged entry is recomputed and replaced
    feats = compute_features(net, images, device=device, progress=progress, desc=desc)
    try:
        atomic_write(path, lambda f: np.save(f, feats))   # straight to the file: no second copy in memory
    except (OSError, EdgehebbError) as e:   # a read-only or full cache must not lose the computed result
        import warnings
        warnings.warn(f"could not write the feature cache {path}: {e}", stacklevel=2)
        return feats
    # Hand back the memory map, as a cache hit does (the matrix in memory goes with this frame): a head
    # trained on the features of the images and of their mirror images then holds neither matrix in memory
    # (the operating system pages them).
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):   # removed or cut short meanwhile by another process: keep ours
        return feats
