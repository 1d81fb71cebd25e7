"""The Krotov-Hopfield rank-update rule: the torch reference every faster backend is tested against.

Grinberg, Hopfield & Krotov (2019), with the options of Krotov & Hopfield's original code (PNAS
2019). For a minibatch of patches v^A (B x N) and weights M (K x N):

    h_mu(A)  = sum_i sign(M_mu,i) |M_mu,i|^(p-1) v^A_i          currents, Lebesgue power p
    g_mu(A)  = 1 for the unit with the largest current, -delta for the unit of rank m, else 0
    ds       = g^T v - (sum_A g h) * M                            (K x N)
    M       += eps * ds / max|ds|

p = 2 gives the plain dot product. Rows converge to unit length (for p = 2; to unit p-norm in
general). Ties between equal currents have probability zero for continuous data; ``torch.topk``
breaks them as it likes, the CUDA kernel breaks them towards the lower unit index.

``rank_by="cosine"`` ranks the units by h_mu / ||M_mu||_p^(p-1) instead of h_mu (the cosine for
p = 2): the ranking the rule reaches at its fixed point, where every row has unit p-norm, applied
from the first step. The update itself is unchanged. It matters for the paper's plain patch norm
(``--preprocess unit``): those patches lie in a narrow cone around the flat patch (CIFAR-10: median
cosine 0.97 with it), so rows whose norm is off by a few percent out-rank better-aligned rows, and
the ranking follows the rows' norm noise instead of the patches (measured: every unit drifts to the
flat patch). Ranked by cosine, the same rule spreads the units over the cone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgehebb.errors import EdgehebbError

# Floor of the max|ds| normaliser, as in the original code: a minibatch that moves nothing
# (all-zero patches) must not divide by zero.
PRECISION = 1e-30
RANK_BY = ("current", "cosine")


@dataclass
class StepResult:
    winners: torch.Tensor  # (B,) int64 index of the top-1 unit of each patch
    ranked: torch.Tensor  # (B,) int64 index of the rank-m unit of each patch
    scale: torch.Tensor  # 0-d, max|ds| of the step before the floor (a tensor: no device sync)


def check_rule(filters: int, rank: int, power: float, delta: float, rank_by: str = "current") -> None:
    """Reject settings under which the rule is undefined."""
    if rank_by not in RANK_BY:
        raise EdgehebbError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANK_BY)}")
    if filters < 2:
        raise EdgehebbError(f"need at least 2 filters for the rank-update rule, got K={filters}")
    if not 2 <= rank <= filters:
        raise EdgehebbError(f"rank m must be in [2, K={filters}], got m={rank}")
    if power < 1:
        raise EdgehebbError(f"Lebesgue power p must be >= 1, got p={power}")
    if delta < 0:
        raise EdgehebbError(f"anti-Hebbian strength delta must be >= 0, got {delta}")


def init_weights(filters: int, dim: int, seed: int) -> torch.Tensor:
    """Standard-normal K x N weights from a CPU generator, so every device starts from the same M."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(filters, dim, generator=gen, dtype=torch.float32)


def currents(M: torch.Tensor, v: torch.Tensor, power: float) -> torch.Tensor:
    """h (B x K): each patch's input current into every unit."""
    if power == 2.0:
        return v @ M.T
    return v @ (M.sign() * M.abs().pow(power - 1.0)).T


def ranking_scores(M: torch.Tensor, h: torch.Tensor, power: float, rank_by: str = "current") -> torch.Tensor:
    """What the ranking compares (B x K): the currents ``h``, or for ``cosine`` h_mu / ||M_mu||_p^(p-1)."""
    if rank_by == "current":
        return h
    scale = M.norm(p=power, dim=1) if power == 2.0 else M.norm(p=power, dim=1).pow(power - 1.0)
    return h / scale.clamp_min(PRECISION)


def rank_update(M: torch.Tensor, v: torch.Tensor, eps: float, power: float = 2.0,
                delta: float = 0.4, rank: int = 2, rank_by: str = "current") -> StepResult:
    """One minibatch step of the rule, updating ``M`` in place."""
    h = currents(M, v, power)
    top = torch.topk(ranking_scores(M, h, power, rank_by), rank, dim=1).indices
    winners, ranked = top[:, 0], top[:, rank - 1]
    return StepResult(winners, ranked, apply_update(M, v, h, winners, ranked, eps, delta))


def apply_update(M: torch.Tensor, v: torch.Tensor, h: torch.Tensor, winners: torch.Tensor, ranked: torch.Tensor,
                 eps: float, delta: float) -> torch.Tensor:
    """The update of one step once the units are ranked, in place on ``M``; returns max|ds|.

    Every backend that must match :func:`rank_update` bit for bit calls this rather than restating it.
    """
    rows = torch.arange(v.shape[0], device=v.device)
    g = torch.zeros_like(h)
    g[rows, winners] = 1.0
    g[rows, ranked] = -delta
    ds = g.T @ v - (g * h).sum(dim=0)[:, None] * M
    scale = ds.abs().max()
    M.add_(ds * (eps / scale.clamp_min(PRECISION)))
    return scale
