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
from edgehebb.learn.hebbian import check_rule, init_weights
from edgehebb.learn.patches import PREPROCESS, nchw_copy, patch_grid, sample_patches, whitening_matrix

# Seconds per backend call. Between calls the progress bar moves, mid-epoch checkpoints are written
# and Ctrl-C is honoured, so calls are short; long enough that a GPU backend keeps its launches back
# to back. The first call runs FIRST_STEPS steps; later ones are sized from the measured rate.
CALL_SECONDS = 0.5
FIRST_STEPS = 4


INITS = ("normal", "patches")


@dataclass
class LearnConfig:
    filters: int = 400
    kernel: int = 4
    stride: int = 1
    epochs: int = 1
    batch: int = 1000
    lr: float = 0.02
    power: float = 2.0
    # The defaults learn the banks of edgehebb's models: the paper's plain patch norm, units starting on
    # data patches and ranked by cosine, and a weaker anti-Hebbian term than Krotov & Hopfield's 0.4,
    # which on plain CIFAR-10 patches pushes every unit out of the cone of patches (0.3 did too; 0.2
    # did not, on 10,000 or 50,000 images). RESULTS.md, "What we tried", has the numbers.
    delta: float = 0.2
    rank: int = 2
    preprocess: str = "unit"
    seed: int = 0
    init: str = "patches"       # starting rows: "patches" (K distinct data patches) or "normal" (the paper)
    rank_by: str = "cosine"     # rank units by "cosine" or by "current" (the paper; hebbian.py says when it matters)
    whiten: float = 0.0         # > 0: learn on whitened patches (patches.whitening_matrix, this its regulariser)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        check_rule(self.filters, self.rank, self.power, self.delta, self.rank_by)
        if self.init not in INITS:
            raise EdgehebbError(f"unknown initialisation {self.init!r}; choose one of {', '.join(INITS)}")
        if self.rank_by == "cosine" and self.init == "normal" and self.delta > 0:
            # Ranked by cosine, a row's length no longer decides whether it wins, so nothing shrinks the
            # rows the anti-Hebbian term lengthens (d|M|^2 ~ delta h (|M|^2 - 1) for the rank-m unit):
            # standard-normal rows (|M| ~ sqrt(N)) grew without bound (CIFAR-10: 23 % validation accuracy).
            raise EdgehebbError("--rank-by cosine with --delta > 0 needs --init patches: standard-normal rows, "
                                "much longer than 1, grow without bound when ranked by cosine")
        h, w, _ = image_shape
        patch_grid(h, w, self.kernel, self.stride)
        for name in ("epochs", "batch"):
            if getattr(self, name) < 1:
                raise EdgehebbError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EdgehebbError(f"learning rate must be > 0, got {self.lr}")
        if self.preprocess not in PREPROCESS:
            raise EdgehebbError(f"unknown preprocessing {self.preprocess!r}; choose one of {', '.join(PREPROCESS)}")
        if self.whiten < 0 or (self.whiten and self.preprocess != "unit"):
            raise EdgehebbError(f"--whiten must be >= 0 and works with --preprocess unit only (the blocks that use "
                                f"such a bank normalise whitened patches), got {self.whiten:g} with {self.preprocess}")
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
    # Where a mid-epoch snapshot stands in epoch ``epochs_done``: minibatch steps done (the order
    # itself is epoch_order(seed, epoch), so the position is enough to continue it), win counts and
    # seconds so far. 0 / None / 0.0 at an epoch boundary.
    position: int = 0
    wins: torch.Tensor | None = None
    seconds: float = 0.0
    threads: dict | None = None  # the CPU backend's thread record (edgehebb.threads), None on a GPU
    whitening: torch.Tensor | None = None   # (N, N) with LearnConfig.whiten: the weights live in its space


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


def resolve_backend(name: str, device: str = "auto", config: LearnConfig | None = None) -> str:
    """``torch`` or ``pycuda`` for ``name`` (torch | pycuda | auto): auto is pycuda when it is usable,
    unless ``device`` asks for the CPU (pycuda always runs on the GPU) or ``config`` asks for what the kernel
    cannot run: whitened patches (the kernel cuts and normalises its patches itself)."""
    whitened = config is not None and config.whiten > 0
    if name == "auto":
        return "pycuda" if device != "cpu" and not whitened and _pycuda_usable() else "torch"
    if name not in ("torch", "pycuda"):
        raise EdgehebbError(f"unknown backend {name!r}; choose auto, torch or pycuda")
    if name == "pycuda" and whitened:
        raise EdgehebbError("the pycuda kernel learns from plain patches only: --whiten needs --backend torch")
    return name


def make_backend(name: str, images: np.ndarray, config: LearnConfig, weights: torch.Tensor, device: str,
                 threads: int | None = None, whitening: torch.Tensor | None = None):
    """The learning backend ``name`` (torch | pycuda | auto), holding ``images`` and ``weights``;
    ``threads`` fixes the CPU backend's thread count (None: measured, edgehebb.threads); ``whitening``:
    the matrix the patches are whitened with (``config.whiten``)."""
    name = resolve_backend(name, device, config)
    if name == "torch":
        from edgehebb.learn.torch_backend import TorchLearner

        return TorchLearner(images, config, weights, device, threads=threads, whitening=whitening)
    if name == "pycuda":
        from edgehebb.learn.pycuda_backend import PycudaLearner

        return PycudaLearner(images, config, weights)


def _pycuda_usable() -> bool:
    try:
        from edgehebb.learn.pycuda_backend import available
    except ImportError:
        return False
    return available()


def initial_weights(images: np.ndarray, config: LearnConfig, whitening: torch.Tensor | None = None) -> torch.Tensor:
    """The starting M (K, C*W*W): standard normal rows (``init="normal"``), or K distinct patches of
    uint8 NHWC ``images``, preprocessed (and whitened) as learning will see them and scaled to unit length."""
    dim = images.shape[3] * config.kernel ** 2
    if config.init == "normal":
        return init_weights(config.filters, dim, config.seed)
    return sample_patches(nchw_copy(images), config.kernel, config.stride, config.filters, config.preprocess, config.seed,
                          whitening)


def whitening_for(images: np.ndarray, config: LearnConfig) -> torch.Tensor | None:
    """The whitening matrix ``config.whiten`` asks for (None without it), estimated from ``images``."""
    if not config.whiten:
        return None
    return whitening_matrix(nchw_copy(images), config.kernel, config.stride, config.whiten, config.seed)


def learn(images: np.ndarray, config: LearnConfig, *, backend: str = "torch", device: str = "cpu",
          state: LearnState | None = None, on_epoch: Callable[[LearnState], None] | None = None,
          on_call: Callable[[Callable[[], LearnState]], None] | None = None, threads: int | None = None,
          progress: bool = True) -> LearnState:
    """Learn (or continue learning) a filter bank from uint8 NHWC ``images``.

    ``state`` continues an earlier run from its last completed epoch, or from the middle of an epoch
    (``state.position``); ``on_epoch`` is called after every epoch (the CLI writes its checkpoint
    there). ``on_call`` is called after every backend call with a function that returns a mid-epoch
    snapshot (fetching the weights costs a copy, so only when wanted); it may raise to stop the run.
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
        z = whitening_for(images, config)
        state = LearnState(initial_weights(images, config, z), whitening=z)
    if bool(config.whiten) != (state.whitening is not None):
        raise EdgehebbError("the run to continue was learned with another --whiten: resume with the same options")
    want = (config.filters, c * config.kernel ** 2)
    if tuple(state.weights.shape) != want:
        raise EdgehebbError(f"the weights to continue from are {tuple(state.weights.shape)}; {config.filters} filters of "
                            f"{config.kernel}x{config.kernel}x{c} need {want}")
    if not 0 <= state.position <= steps:
        raise EdgehebbError(f"the run to continue stopped after step {state.position} of an epoch, but an epoch of "
                            f"this data has {steps} steps")
    runner = make_backend(backend, images, config, state.weights, device, threads, state.whitening)
    B = config.batch

    from tqdm import tqdm

    for epoch in range(state.epochs_done, config.epochs):
        eps = config.lr * (1.0 - epoch / config.epochs)
        order = epoch_order(n_patches, config.seed, epoch)[: steps * B]
        pos, wins, before = state.position, state.wins, state.seconds   # where a snapshot left this epoch
        wins = torch.zeros(config.filters, dtype=torch.int64) if wins is None else wins.clone()
        state.position, state.wins, state.seconds = 0, None, 0.0
        t0 = time.perf_counter()
        bar = tqdm(total=steps * B, initial=pos * B, unit="patch", unit_scale=True, disable=not progress,
                   desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, smoothing=0.1,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} patches "
                              "[{elapsed}<{remaining}, {rate_fmt}]")
        call = FIRST_STEPS
        while pos < steps:
            call = min(call, steps - pos)
            t_call = time.perf_counter()
            wins += runner.run(order[pos * B:(pos + call) * B], eps)
            per_step = (time.perf_counter() - t_call) / call
            pos += call
            bar.update(call * B)
            if on_call is not None:
                def snapshot(pos=pos) -> LearnState:
                    return LearnState(runner.weights(), epoch, list(state.history), pos, wins.clone(),
                                      before + time.perf_counter() - t0, whitening=state.whitening)

                on_call(snapshot)
            # the next call lasts about CALL_SECONDS, and grows at most 4x (one fast call is no proof)
            call = max(1, min(4 * call, round(CALL_SECONDS / max(per_step, 1e-9))))
        bar.close()
        seconds = before + time.perf_counter() - t0
        state.weights = runner.weights()
        state.epochs_done = epoch + 1
        state.history.append(EpochStats(
            epoch=epoch + 1, eps=eps, norm_error=row_norm_error(state.weights, config.power),
            dead_fraction=float((wins == 0).float().mean()), seconds=seconds,
            patches_per_s=steps * B / max(seconds, 1e-9)))
        if on_epoch is not None:
            on_epoch(state)
    state.threads = getattr(runner, "threads_report", lambda: None)()   # the GPU backends have none
    return state
