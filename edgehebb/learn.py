"""Learning a filter bank: epochs, shuffling, annealing, statistics, checkpoints and resume.

The schedule follows Krotov & Hopfield's code: each epoch draws a fresh permutation of all patch
positions, takes ``n_patches // batch`` minibatches in that order (the remainder is dropped), and
uses ``eps = lr * (1 - epoch / epochs)``. The permutation of epoch ``e`` comes from a CPU generator
seeded with ``(seed, e)``, so a resumed run sees exactly the patches an uninterrupted run would, and
every backend (torch on CPU or CUDA, the PyCUDA kernel) sees the same order for the same seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgehebb.errors import EdgehebbError
from edgehebb.hebbian import check_rule, init_weights
from edgehebb.patches import PREPROCESS, patch_grid

# Steps per backend call: the progress bar moves this often; large enough that a GPU backend
# keeps its launches back to back.
STEPS_PER_CALL = 256


@dataclass
class LearnConfig:
    filters: int = 400
    kernel: int = 4
    stride: int = 1
    epochs: int = 1
    batch: int = 1000
    lr: float = 0.02
    power: float = 2.0
    delta: float = 0.4
    rank: int = 2
    preprocess: str = "center-unit"
    seed: int = 0

    def check(self, image_shape: tuple[int, int, int]) -> None:
        check_rule(self.filters, self.rank, self.power, self.delta)
        h, w, _ = image_shape
        patch_grid(h, w, self.kernel, self.stride)
        for name in ("epochs", "batch"):
            if getattr(self, name) < 1:
                raise EdgehebbError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EdgehebbError(f"learning rate must be > 0, got {self.lr}")
        if self.preprocess not in PREPROCESS:
            raise EdgehebbError(f"unknown preprocessing {self.preprocess!r}; choose one of {', '.join(PREPROCESS)}")
        check_seed(self.seed)


@dataclass
class EpochStats:
    epoch: int  # 1-based, completed
    eps: float
    norm_error: float  # mean |row p-norm - 1| (the Lebesgue power p: rows converge to unit p-norm)
    dead_fraction: float  # units that never won a patch in the epoch
    seconds: float
    patches_per_s: float


@dataclass
class LearnState:
    weights: torch.Tensor  # (K, C*W*W) CPU float32
    epochs_done: int = 0
    history: list[EpochStats] = field(default_factory=list)


def epoch_order(n_patches: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled patch order of one epoch, the same on every device and on resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_patches, generator=gen)


def row_norm_error(weights: torch.Tensor, power: float = 2.0) -> float:
    """Mean |row p-norm - 1|: the rule's fixed point is unit p-norm rows for Lebesgue power p."""
    return float((weights.double().norm(p=power, dim=1) - 1.0).abs().mean())


def check_seed(seed: int) -> None:
    """Seeds go to numpy and torch generators, which take [0, 2^32)."""
    if not 0 <= seed < 2 ** 32:
        raise EdgehebbError(f"seed must be in [0, 2^32), got {seed}")


def resolve_backend(name: str, device: str = "auto") -> str:
    """``torch`` or ``pycuda`` for ``name`` (torch | pycuda | auto): auto is pycuda when it can run,
    unless ``device`` asks for the CPU (pycuda always runs on the GPU)."""
    if name == "auto":
        return "pycuda" if device != "cpu" and _pycuda_usable() else "torch"
    if name not in ("torch", "pycuda"):
        raise EdgehebbError(f"unknown backend {name!r}; choose auto, torch or pycuda")
    return name


def make_backend(name: str, images: np.ndarray, config: LearnConfig, weights: torch.Tensor, device: str):
    """The learning backend ``name`` (torch | pycuda | auto), holding ``images`` and ``weights``."""
    name = resolve_backend(name, device)
    if name == "torch":
        from edgehebb.learn_torch import TorchBackend

        return TorchBackend(images, config, weights, device)
    if name == "pycuda":
        from edgehebb.learn_pycuda import PyCudaBackend

        return PyCudaBackend(images, config, weights)


def _pycuda_usable() -> bool:
    try:
        from edgehebb.learn_pycuda import available
    except ImportError:
        return False
    return available()


def learn(images: np.ndarray, config: LearnConfig, *, backend: str = "torch", device: str = "cpu",
          state: LearnState | None = None, on_epoch: Callable[[LearnState], None] | None = None,
          progress: bool = True) -> LearnState:
    """Learn (or continue learning) a filter bank from uint8 NHWC ``images``.

    ``state`` continues an earlier run from its last completed epoch; ``on_epoch`` is called after
    every epoch (the CLI writes its checkpoint there).
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise EdgehebbError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    config.check(images.shape[1:])
    n, h, w, c = images.shape
    ny, nx = patch_grid(h, w, config.kernel, config.stride)
    n_patches = n * ny * nx
    steps = n_patches // config.batch
    if steps == 0:
        raise EdgehebbError(f"batch {config.batch} is larger than the {n_patches} patches of the data")
    if state is None:
        state = LearnState(init_weights(config.filters, c * config.kernel ** 2, config.seed))
    want = (config.filters, c * config.kernel ** 2)
    if tuple(state.weights.shape) != want:
        raise EdgehebbError(f"the weights to continue from are {tuple(state.weights.shape)}; {config.filters} filters of "
                            f"{config.kernel}x{config.kernel}x{c} need {want}")
    runner = make_backend(backend, images, config, state.weights, device)

    from tqdm import tqdm

    for epoch in range(state.epochs_done, config.epochs):
        eps = config.lr * (1.0 - epoch / config.epochs)
        order = epoch_order(n_patches, config.seed, epoch)[: steps * config.batch]
        wins = torch.zeros(config.filters, dtype=torch.int64)
        t0 = time.perf_counter()
        bar = tqdm(total=steps * config.batch, unit="patch", unit_scale=True, disable=not progress,
                   desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        chunk = STEPS_PER_CALL * config.batch
        for start in range(0, len(order), chunk):
            wins += runner.run(order[start:start + chunk], eps)
            bar.update(min(chunk, len(order) - start))
        bar.close()
        seconds = time.perf_counter() - t0
        state.weights = runner.weights()
        state.epochs_done = epoch + 1
        state.history.append(EpochStats(
            epoch=epoch + 1, eps=eps, norm_error=row_norm_error(state.weights, config.power),
            dead_fraction=float((wins == 0).float().mean()), seconds=seconds,
            patches_per_s=steps * config.batch / max(seconds, 1e-9)))
        if on_epoch is not None:
            on_epoch(state)
    return state
