"""The torch learning backend: the rule of ``hebbian.py`` run minibatch by minibatch on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch

from edgehebb.hebbian import rank_update
from edgehebb.patches import PatchSampler, preprocess


class TorchBackend:
    """Holds the images and the weights on one torch device and runs the rule over patch orders.

    Every backend has this shape: ``run(order, eps)`` consumes ``len(order) // batch`` minibatches
    whose patch indices are ``order`` in sequence and returns how often each unit won; ``weights()``
    returns a CPU float32 copy of M.
    """

    name = "torch"

    def __init__(self, images: np.ndarray, config, weights: torch.Tensor, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        nchw = torch.tensor(images).permute(0, 3, 1, 2).contiguous()  # copies: images may be a read-only memmap
        self.sampler = PatchSampler(nchw.to(self.device), config.kernel, config.stride)
        self.M = weights.to(self.device, torch.float32).clone()

    def run(self, order: torch.Tensor, eps: float) -> torch.Tensor:
        cfg = self.config
        wins = torch.zeros(cfg.filters, dtype=torch.int64, device=self.device)
        order = order.to(self.device)
        for start in range(0, len(order) - cfg.batch + 1, cfg.batch):
            v = preprocess(self.sampler.gather(order[start:start + cfg.batch]), cfg.preprocess)
            step = rank_update(self.M, v, eps, cfg.power, cfg.delta, cfg.rank)
            wins += torch.bincount(step.winners, minlength=cfg.filters)
        return wins.cpu()

    def weights(self) -> torch.Tensor:
        return self.M.detach().to("cpu", torch.float32).clone()
