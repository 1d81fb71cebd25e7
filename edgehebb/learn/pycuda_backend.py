"""The PyCUDA learning backend: the rank-update rule as one persistent kernel (cuda/hebbian_step.cu).

Same interface as ``learn_torch.TorchLearner``: the images (uint8, NHWC) and the weights live on the
GPU; ``run(order, eps)`` does ``len(order) // batch`` minibatch steps in a few launches of a
persistent kernel (each launch runs many steps, with grid-wide barriers between their phases) and
returns the win counts; ``weights()`` copies M back. The kernel computes the same rule as
``hebbian.rank_update``, with either ranking (``rank_by``; tested against it on the GPU) and gives
bitwise the same M for any grid size, tile shape or split of the steps into calls. Measurements: notes/pycuda-kernel.md.

pycuda is imported inside the functions that need it; without pycuda, a GPU or nvcc, constructing
the backend raises one ``EdgehebbError`` line saying what is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from edgehebb.resources import cuda_source
from edgehebb.cuda_driver import Active, available, compiled_module, context, driver  # noqa: F401 (available: learn.py)
from edgehebb.errors import EdgehebbError
from edgehebb.learn.hebbian import PRECISION, RANK_BY, check_rule
from edgehebb.learn.patches import PREPROCESS, patch_grid

KERNEL_FILE = "hebbian_step.cu"
THREADS = 256  # 8 warps per block, one block per multiprocessor
GROUPS = 2  # LB: patch groups per warp; LK = 32 / GROUPS lanes share one patch group's units
MAX_PAIRS = 13  # TK2 cap: a lane holds at most TB x 26 currents (<= 104 registers at TB = 4)
TILES = (4, 2, 1)  # TB: patches per lane
# The accumulator is fixed point with 2^-32 resolution in a signed 64-bit integer: the sum of one
# step's |g * v| must stay below 2^31.
MAX_STEP_MASS = 2 ** 30
# A grid barrier that waits longer than this reports a fault instead of hanging (cuda/hebbian_step.cu,
# "Residency"): far above any step's phase, short of a user giving up.
BARRIER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class KernelPlan:
    """Compile-time constants and launch geometry of one kernel instance."""

    defines: tuple[tuple[str, int], ...]
    blocks: int
    threads: int
    shared_bytes: int
    padded_filters: int  # KP, the row stride of Mp^T

    def define(self, name: str) -> int:
        return dict(self.defines)[name]

    @property
    def options(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in self.defines]


def _shape(dim: int, filters: int, tile: int, shared_limit: int) -> tuple[int, int, int, int]:
    """(TK2, K chunks, n per shared tile, shared bytes) of a tile of ``tile`` patches per lane."""
    lanes = 32 // GROUPS
    pairs = min(MAX_PAIRS, math.ceil(filters / (2 * lanes)))
    chunk = 2 * lanes * pairs  # KCH
    patch_bytes = (THREADS // 32) * dim * GROUPS * tile * 4
    n_chunk = min(dim, (shared_limit - patch_bytes) // (chunk * 4))
    if n_chunk < 1:
        raise EdgehebbError(f"patches of {dim} values do not fit the device's {shared_limit} bytes of shared memory")
    return pairs, math.ceil(filters / chunk), n_chunk, n_chunk * chunk * 4 + patch_bytes


def _tile_cost(batch: int, tile: int, dim: int, filters: int, sms: int, shared_limit: int) -> tuple[float, int]:
    """(estimated cycles of phase A per step, blocks) for ``tile`` patches per lane.

    Issue cycles of the FMAs per SM sub-partition or shared-memory wavefronts per SM, whichever is
    larger, times 1.5, plus ~150 * N cycles per round for cutting, preprocessing, merging and
    accumulating (both factors fitted to the H100 tile sweep in notes/pycuda-kernel.md), plus the
    re-copy of Mp per round when it does not fit in shared memory.
    """
    pairs, k_chunks, n_chunk, _ = _shape(dim, filters, tile, shared_limit)
    warps = THREADS // 32
    tiles = math.ceil(batch / (GROUPS * tile))
    blocks = min(sms, tiles)
    per_block = math.ceil(tiles / blocks)
    rounds = math.ceil(per_block / warps)
    busy = min(warps, per_block)
    fma = math.ceil(busy / 4) * tile * 2 * pairs * dim * k_chunks
    lds = busy * (pairs + 1) * dim * k_chunks
    resident = k_chunks == 1 and n_chunk == dim
    copy = 0 if resident else dim * 2 * (32 // GROUPS) * pairs * k_chunks * 4 / 64  # bytes / (64 B per cycle)
    return rounds * (1.5 * max(fma, lds) + 150 * dim + copy), blocks


def kernel_plan(*, filters: int, dim: int, channels: int, kernel: int, stride: int, rank: int,
                power: float, preprocess: str, batch: int, sms: int, shared_limit: int,
                blocks: int | None = None, tile: int | None = None, rank_by: str = "current",
                barrier_timeout_s: float = BARRIER_TIMEOUT_S) -> KernelPlan:
    """Choose the kernel's constants and launch geometry for one configuration on one device.

    ``sms`` and ``shared_limit`` (opt-in shared memory per block, bytes) describe the device;
    ``blocks`` and ``tile`` (TB in 4, 2, 1) override the choice, e.g. in tests. Results do not
    depend on either: they only move work around.
    """
    if preprocess not in PREPROCESS:
        raise EdgehebbError(f"unknown preprocessing {preprocess!r}; choose one of {', '.join(PREPROCESS)}")
    if rank_by not in RANK_BY:
        raise EdgehebbError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANK_BY)}")
    if tile is None:
        tile = min(TILES, key=lambda tb: _tile_cost(batch, tb, dim, filters, sms, shared_limit)[0])
    if tile not in TILES:
        raise EdgehebbError(f"tile must be one of {TILES}, got {tile}")
    if blocks is None:
        blocks = _tile_cost(batch, tile, dim, filters, sms, shared_limit)[1]
    if not 1 <= blocks <= sms:
        raise EdgehebbError(f"blocks must be in [1, {sms}] (one resident block per multiprocessor), got {blocks}")
    pairs, k_chunks, n_chunk, shared_bytes = _shape(dim, filters, tile, shared_limit)
    rp = 1 << (rank - 1).bit_length()
    defines = dict(
        K=filters, N=dim, CH=channels, KW=kernel, STRIDE=stride, RANK=rank, RP=rp,
        PRE=PREPROCESS.index(preprocess), POW2=int(power == 2.0), RANK_COS=int(rank_by == "cosine"),
        NTHREADS=THREADS, LB=GROUPS,
        TB=tile, TK2=pairs, NKC=k_chunks, NC=n_chunk, NNC=math.ceil(dim / n_chunk),
        GRID_TIMEOUT_NS=round(barrier_timeout_s * 1e9),
    )
    chunk = 2 * (32 // GROUPS) * pairs
    return KernelPlan(defines=tuple(defines.items()), blocks=blocks, threads=THREADS,
                      shared_bytes=shared_bytes, padded_filters=chunk * k_chunks)


def check_barrier(words, plan: KernelPlan) -> None:
    """Raise if the kernel's fault word (``words[1]``, after a launch) is set: a grid barrier timed out."""
    if int(words[1]) != 0:
        raise EdgehebbError(
            f"the pycuda kernel stopped: a grid barrier waited over {plan.define('GRID_TIMEOUT_NS') / 1e9:g} s, "
            f"so its {plan.blocks} blocks were not all running at once (a GPU shared through MPS with an SM limit, "
            "or another process's kernels?); the weights are those of the last finished step: resume from the "
            "last checkpoint (--resume), or learn with --backend torch")


def lebesgue(M: np.ndarray, power: float) -> np.ndarray:
    """sign(M) |M|^(p-1), the weights the currents use (float32)."""
    if power == 2.0:
        return M
    return (np.sign(M) * np.abs(M) ** np.float32(power - 1.0)).astype(np.float32)


def transposed_currents_weights(M: np.ndarray, power: float, padded: int, rank_by: str = "current") -> np.ndarray:
    """Mp^T as the kernel reads it: (N, padded) float32, sign(M)|M|^(p-1) transposed, zero for k >= K;
    for ``rank_by="cosine"`` each unit's column divided by max(||M_k||_p^(p-1), 1e-30), as the
    kernel's phase C writes it (here from a float64 norm: only the first step's ranking sees it)."""
    mp = lebesgue(M, power)
    if rank_by == "cosine":
        norm = np.linalg.norm(M.astype(np.float64), ord=power, axis=1)
        scale = np.maximum(norm if power == 2.0 else norm ** (power - 1.0), PRECISION)
        mp = (mp / scale[:, None]).astype(np.float32)
    out = np.zeros((M.shape[1], padded), dtype=np.float32)
    out[:, : M.shape[0]] = mp.T
    return out


# ------------------------------------------------------------------------------------------------
# pycuda, imported lazily (edgehebb.cuda_driver)

_FUNCTIONS: dict[tuple, object] = {}


def _module(ordinal: int, plan: KernelPlan):
    """The compiled module for ``plan``."""
    return compiled_module(ordinal, cuda_source(KERNEL_FILE), plan.options)


def _kernel(ordinal: int, plan: KernelPlan):
    key = (ordinal, plan.defines)
    if key not in _FUNCTIONS:
        fn = _module(ordinal, plan).get_function("hebbian_run")  # each get_function is a new, unprepared object
        fn.prepare("PiiiiPiifffPPPPPPPPP")
        _FUNCTIONS[key] = fn
    return _FUNCTIONS[key]


def grid_barrier_seconds(blocks: int, iters: int = 20000, device: int = 0) -> float:
    """GPU time of one grid-wide barrier of the kernel with ``blocks`` resident blocks (a measurement)."""
    cuda = driver()
    ctx = context(device)
    with Active(ctx):
        dev, attr = ctx.get_device(), cuda.device_attribute
        plan = kernel_plan(filters=400, dim=48, channels=3, kernel=4, stride=1, rank=2, power=2.0,
                           preprocess="center-unit", batch=1000, sms=dev.get_attribute(attr.MULTIPROCESSOR_COUNT),
                           shared_limit=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), blocks=blocks)
        fn = _module(device, plan).get_function("grid_sync_bench")
        counter = cuda.mem_alloc(8)  # [counter, fault word]
        cuda.memset_d32(counter, 0, 2)
        start, end = cuda.Event(), cuda.Event()
        fn(counter, np.int32(10), block=(plan.threads, 1, 1), grid=(blocks, 1))  # warm-up
        start.record()
        fn(counter, np.int32(iters), block=(plan.threads, 1, 1), grid=(blocks, 1))
        end.record()
        end.synchronize()
        words = np.empty(2, np.uint32)
        cuda.memcpy_dtoh(words, counter)
        check_barrier(words, plan)
        return end.time_since(start) * 1e-3 / iters


class PycudaLearner:
    """Images and weights on one GPU; each ``run`` is up to four launches of the persistent kernel."""

    name = "pycuda"

    def __init__(self, images: np.ndarray, config, weights: torch.Tensor, *, device: int = 0,
                 blocks: int | None = None, tile: int | None = None):
        cuda = driver()
        self._ctx = context(device)
        self.config = cfg = config
        if images.ndim != 4 or images.dtype != np.uint8:
            raise EdgehebbError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        check_rule(cfg.filters, cfg.rank, cfg.power, cfg.delta, cfg.rank_by)
        n, h, w, c = images.shape
        self.ny, self.nx = patch_grid(h, w, cfg.kernel, cfg.stride)
        self.n_patches = n * self.ny * self.nx
        if self.n_patches >= 2 ** 31:
            raise EdgehebbError(f"{self.n_patches} patch positions exceed the kernel's 32-bit indices")
        if cfg.batch * max(1.0, cfg.delta) >= MAX_STEP_MASS:
            raise EdgehebbError(f"batch x max(1, delta) must stay below {MAX_STEP_MASS} for the kernel's accumulator")
        self.dim = c * cfg.kernel ** 2
        K = cfg.filters
        if tuple(weights.shape) != (K, self.dim):
            raise EdgehebbError(f"weights must be ({K}, {self.dim}), got {tuple(weights.shape)}")
        self._shape = (h, w)
        with Active(self._ctx):
            dev = self._ctx.get_device()
            attr = cuda.device_attribute
            self.device_name = dev.name()
            self.sms = dev.get_attribute(attr.MULTIPROCESSOR_COUNT)
            shared_limit = dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            self.plan = kernel_plan(filters=K, dim=self.dim, channels=c, kernel=cfg.kernel, stride=cfg.stride,
                                    rank=cfg.rank, power=cfg.power, preprocess=cfg.preprocess, batch=cfg.batch,
                                    sms=self.sms, shared_limit=shared_limit, blocks=blocks, tile=tile,
                                    rank_by=cfg.rank_by)
            self._fn = _kernel(device, self.plan)
            self._fn.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, self.plan.shared_bytes)
            regs = self._fn.num_regs
            if regs * self.plan.threads > dev.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR):
                raise EdgehebbError(f"kernel needs {regs} registers per thread: a block does not fit a multiprocessor")
            self.kernel_info = dict(registers=regs, local_bytes=self._fn.local_size_bytes,
                                    shared_bytes=self.plan.shared_bytes, blocks=self.plan.blocks,
                                    threads=self.plan.threads, tile=self.plan.define("TB"))
            self._images = cuda.to_device(np.array(images, dtype=np.uint8, order="C"))  # images may be a read-only memmap
            kp = self.plan.padded_filters
            self._M = cuda.mem_alloc(K * self.dim * 4)
            self._MpT = cuda.mem_alloc(self.dim * kp * 4)
            self._ds = cuda.mem_alloc(K * self.dim * 4)
            self._acc = cuda.mem_alloc(K * self.dim * 8)
            self._scale = cuda.mem_alloc(8)
            self._wins = cuda.mem_alloc(K * 4)
            self._barrier = cuda.mem_alloc(8)  # [counter, fault word]
            cuda.memset_d32(self._acc, 0, K * self.dim * 2)
            cuda.memset_d32(self._barrier, 0, 2)
            self._capacity = 0  # patch indices the order buffers hold
            self._dbg_capacity = 0
            self._stream = cuda.Stream()
            self._wins_host = cuda.pagelocked_empty(K, np.uint32)
            self._barrier_host = cuda.pagelocked_empty(2, np.uint32)
            self._start, self._end = cuda.Event(), cuda.Event()
        self.set_weights(weights)
        self.last_kernel_seconds = 0.0  # GPU time of the latest run: index uploads and kernels (CUDA events)
        self.kernel_seconds = 0.0  # summed over all runs

    # -- weights --------------------------------------------------------------------------------

    def set_weights(self, weights: torch.Tensor) -> None:
        """Replace M (K, N) on the device."""
        cuda = driver()
        M = np.ascontiguousarray(weights.detach().cpu().numpy(), dtype=np.float32)
        mpt = transposed_currents_weights(M, self.config.power, self.plan.padded_filters, self.config.rank_by)
        with Active(self._ctx):
            cuda.memcpy_htod(self._M, M)
            cuda.memcpy_htod(self._MpT, np.ascontiguousarray(mpt))

    def weights(self) -> torch.Tensor:
        cuda = driver()
        out = np.empty((self.config.filters, self.dim), dtype=np.float32)
        with Active(self._ctx):
            cuda.memcpy_dtoh(out, self._M)
        return torch.from_numpy(out)

    # -- steps ----------------------------------------------------------------------------------

    def run(self, order: torch.Tensor, eps: float) -> torch.Tensor:
        """``len(order) // batch`` minibatch steps over patch indices ``order``; win counts (K,) int64."""
        return self._launch(order, eps, detail=False)[0]

    def run_detail(self, order: torch.Tensor, eps: float):
        """Like ``run``, also returning each patch's winner and rank-m unit, (steps, batch) int64."""
        return self._launch(order, eps, detail=True)

    def _reserve(self, n: int, detail: bool) -> None:
        cuda = driver()
        if self._capacity < n:
            self._order = cuda.mem_alloc(n * 4)
            self._pinned = cuda.pagelocked_empty(n, np.int32)  # index staging for async copies
            self._pinned_t = torch.from_numpy(self._pinned)
            self._capacity = n
        if detail and self._dbg_capacity < n:
            self._dbg = (cuda.mem_alloc(n * 4), cuda.mem_alloc(n * 4))
            self._dbg_capacity = n

    @staticmethod
    def _pieces(steps: int) -> list[tuple[int, int]]:
        """Split a call into up to 4 launches so that converting and uploading the indices of one
        overlaps the kernel of the one before (M carries over: it lives on the device)."""
        count = max(1, min(4, steps // 16))
        bounds = [steps * i // count for i in range(count + 1)]
        return [(a, b - a) for a, b in zip(bounds, bounds[1:])]

    def _launch(self, order: torch.Tensor, eps: float, detail: bool):
        cuda = driver()
        cfg = self.config
        B, K = cfg.batch, cfg.filters
        steps = len(order) // B
        if steps == 0:
            empty = torch.zeros(0, B, dtype=torch.int64)
            return torch.zeros(K, dtype=torch.int64), empty, empty
        order = torch.as_tensor(order)[: steps * B]
        lo, hi = (int(x) for x in torch.aminmax(order))
        if lo < 0 or hi >= self.n_patches:
            raise EdgehebbError(f"patch indices must be in [0, {self.n_patches}), got [{lo}, {hi}]")
        n, stream, h, w = steps * B, self._stream, *self._shape
        with Active(self._ctx):
            self._reserve(n, detail)
            cuda.memset_d32_async(self._wins, 0, K, stream)
            self._start.record(stream)
            for first, count in self._pieces(steps):
                a, b = first * B, (first + count) * B
                self._pinned_t[a:b].copy_(order[a:b])  # int64 -> int32 while the GPU runs the last piece
                cuda.memcpy_htod_async(int(self._order) + 4 * a, self._pinned[a:b], stream)
                cuda.memset_d32_async(self._scale, 0, 2, stream)
                dbg = (int(self._dbg[0]) + 4 * a, int(self._dbg[1]) + 4 * a) if detail else (0, 0)
                self._fn.prepared_async_call(
                    (self.plan.blocks, 1, 1), (self.plan.threads, 1, 1), stream,
                    self._images, h, w, self.nx, self.ny * self.nx, np.intp(int(self._order) + 4 * a), B, count,
                    np.float32(eps), np.float32(cfg.power), np.float32(cfg.delta),
                    self._M, self._MpT, self._ds, self._acc, self._scale, self._wins, self._barrier,
                    np.intp(dbg[0]), np.intp(dbg[1]), shared_size=self.plan.shared_bytes)
            self._end.record(stream)
            cuda.memcpy_dtoh_async(self._wins_host, self._wins, stream)
            cuda.memcpy_dtoh_async(self._barrier_host, self._barrier, stream)
            stream.synchronize()  # a kernel fault raises here
            if self._barrier_host[1] != 0:  # a barrier timed out: clear the grid's state for a later run
                cuda.memset_d32(self._barrier, 0, 2)
                cuda.memset_d32(self._acc, 0, K * self.dim * 2)
                check_barrier(self._barrier_host, self.plan)
            # GPU time from the first index upload to the last kernel's end (CUDA events)
            self.last_kernel_seconds = self._end.time_since(self._start) * 1e-3
            self.kernel_seconds += self.last_kernel_seconds
            wins = torch.from_numpy(self._wins_host.astype(np.int64))
            winners = ranked = None
            if detail:
                winners, ranked = np.empty(n, np.int32), np.empty(n, np.int32)
                cuda.memcpy_dtoh(winners, self._dbg[0])
                cuda.memcpy_dtoh(ranked, self._dbg[1])
                winners = torch.from_numpy(winners.astype(np.int64).reshape(steps, B))
                ranked = torch.from_numpy(ranked.astype(np.int64).reshape(steps, B))
        return wins, winners, ranked
