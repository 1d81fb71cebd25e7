"""The torch learning backend: the rule of ``hebbian.py`` run minibatch by minibatch on CPU or CUDA.

On CUDA every step is :func:`edgehebb.learn.hebbian.rank_update` itself. On the CPU the step is the same
computation, op for op, except that the top-1 and rank-m units are found by repeated ``argmax`` in
numpy instead of ``torch.topk`` (50 us instead of 1.1 ms on a 1000 x 400 minibatch, a third of the
reference step), and the thread count is measured as the run goes (:mod:`edgehebb.threads`). Both
give the same indices (ties aside, which have probability zero for continuous data; numpy takes the
lower unit index, as the CUDA kernel does), so the CPU backend learns bitwise the same filters as the
reference (tests/test_learn.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edgehebb.learn.hebbian import apply_update, currents, rank_update, ranking_scores
from edgehebb.learn.patches import PatchSampler, nchw_copy, preprocess, whiten
from edgehebb.allocator import keep_freed_memory
from edgehebb.threads import ThreadTuner

# Ranks up to this are found by masking and repeating argmax; beyond, one topk is cheaper.
ARGMAX_RANKS = 8


def top_units(h: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1, rank-``rank``) unit of every row of the CPU currents ``h`` (B x K), as torch.topk finds them."""
    if rank > ARGMAX_RANKS:
        top = torch.topk(h, rank, dim=1).indices
        return top[:, 0], top[:, rank - 1]
    hn = h.numpy()   # shares h's memory: the masked values are put back below
    rows = np.arange(len(hn))
    masked = []
    for _ in range(rank - 1):
        unit = hn.argmax(1)
        masked.append((unit, hn[rows, unit].copy()))
        hn[rows, unit] = -np.inf
    last = hn.argmax(1)
    for unit, value in reversed(masked):
        hn[rows, unit] = value
    return torch.from_numpy(masked[0][0]), torch.from_numpy(last)   # rank >= 2: masked is never empty


def cpu_rank_update(M: torch.Tensor, v: torch.Tensor, eps: float, power: float = 2.0, delta: float = 0.4,
                    rank: int = 2, rank_by: str = "current") -> torch.Tensor:
    """One step of :func:`edgehebb.learn.hebbian.rank_update` on CPU tensors, updating ``M``; returns the winners.

    Only the ranking differs (a numpy top-2, faster on the CPU and with the same ties); the update is the
    reference's own :func:`edgehebb.learn.hebbian.apply_update`, which is what keeps the filters bitwise equal.
    """
    h = currents(M, v, power)
    winners, ranked = top_units(ranking_scores(M, h, power, rank_by) if rank_by != "current" else h, rank)
    apply_update(M, v, h, winners, ranked, eps, delta)
    return winners


class TorchLearner:
    """Holds the images and the weights on one torch device and runs the rule over patch orders.

    Every backend has this shape: ``run(order, eps)`` consumes ``len(order) // batch`` minibatches
    whose patch indices are ``order`` in sequence and returns how often each unit won; ``weights()``
    returns a CPU float32 copy of M. On the CPU, ``threads`` fixes torch's thread count (None: the
    process-wide ``--threads``, else measured per step); ``threads_report()`` says what was used.
    """

    name = "torch"

    def __init__(self, images: np.ndarray, config, weights: torch.Tensor, device: str = "cpu",
                 threads: int | None = None, whitening: torch.Tensor | None = None):
        self.config = config
        self.device = torch.device(device)
        self.whitening = None if whitening is None else whitening.to(self.device, torch.float32)
        nchw = nchw_copy(images)
        self.sampler = PatchSampler(nchw.to(self.device), config.kernel, config.stride)
        self.M = weights.to(self.device, torch.float32).clone()
        self.tuner = ThreadTuner(threads) if self.device.type == "cpu" else None
        if self.tuner is not None:
            keep_freed_memory()
        # CPU gather: one index_select of flat offsets (PatchSampler's advanced indexing costs 3x more)
        n, c, h, w = nchw.shape
        ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(config.kernel), torch.arange(config.kernel),
                                  indexing="ij")
        self._offsets = (ch * h * w + i * w + j).reshape(1, -1)

    def run(self, order: torch.Tensor, eps: float) -> torch.Tensor:
        if self.tuner is None:
            return self._run_cuda(order, eps)
        cfg = self.config
        wins = torch.zeros(cfg.filters, dtype=torch.int64)
        with self.tuner:
            for start in range(0, len(order) - cfg.batch + 1, cfg.batch):
                self.tuner.choose()
                t0 = time.perf_counter()
                v = preprocess(whiten(self._gather(order[start:start + cfg.batch]), self.whitening), cfg.preprocess)
                winners = cpu_rank_update(self.M, v, eps, cfg.power, cfg.delta, cfg.rank, cfg.rank_by)
                wins += torch.bincount(winners, minlength=cfg.filters)
                self.tuner.record(time.perf_counter() - t0, cfg.batch)
        return wins

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """PatchSampler.gather on the CPU, the same values."""
        at = self.sampler.corners(index)[:, None] + self._offsets
        flat = self.sampler.images.view(-1)
        return flat.index_select(0, at.view(-1)).view(len(index), -1).float().div_(255.0)

    def _run_cuda(self, order: torch.Tensor, eps: float) -> torch.Tensor:
        cfg = self.config
        wins = torch.zeros(cfg.filters, dtype=torch.int64, device=self.device)
        order = order.to(self.device)
        for start in range(0, len(order) - cfg.batch + 1, cfg.batch):
            v = preprocess(whiten(self.sampler.gather(order[start:start + cfg.batch]), self.whitening),
                           cfg.preprocess)
            step = rank_update(self.M, v, eps, cfg.power, cfg.delta, cfg.rank, cfg.rank_by)
            wins += torch.bincount(step.winners, minlength=cfg.filters)
        return wins.cpu()

    def weights(self) -> torch.Tensor:
        return self.M.detach().to("cpu", torch.float32).clone()

    def threads_report(self) -> dict | None:
        return self.tuner.report() if self.tuner is not None else None
