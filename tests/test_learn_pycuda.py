"""The PyCUDA learning backend against the torch oracle (edgehebb/learn/hebbian.py).

CPU tests run everywhere: the kernel source is found, the launch plan is sane, and without pycuda or
a GPU the backend fails with one line. The kernel's own source also runs on the CPU, built with g++
(tests/host_cuda: every CUDA thread an OS thread, shuffles, atomics and grid barriers emulated)
against the oracle: the same winners, M after several steps, and bitwise the same M for any grid
size or tile, including the non-resident path that streams Mp through shared memory, with units
ranked by current or by cosine (``rank_by``, the kernel's RANK_COS); a grid barrier whose blocks
cannot all run at once times out with one line instead of hanging. GPU tests (marker ``gpu``) need
pycuda, an NVIDIA GPU, nvcc and torch with CUDA; they are skipped with a reason otherwise, decided
inside a fixture so that collecting this module never touches the CUDA driver.

Tolerances. The kernel and cuBLAS both sum in float32, in different orders, so a current can differ
by ~1e-7 relative. Winners must agree for every patch whose top-1/top-2 (or rank-m/rank-m+1) gap,
computed in float64, is above 1e-5 relative; closer pairs are genuine ties at float32 precision and
are reported, not failed (none turned up in 100k patches on CPU). After one step from identical M
the weights agree to 1e-5 absolute. Free running, an occasional near-tie flip moves a row by up to
~eps/|ds|: on CPU, float32 against float64 over 100 steps (K=400, W=4, B=1000, random images) gave
max|dM| = 1.6e-3 and a relative Frobenius error of 7e-5, so 100 steps are held to 1e-2 and 1e-3.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from typing import NamedTuple

import numpy as np
import pytest
import torch

from edgehebb import cuda_driver
from edgehebb.learn import pycuda_backend as learn_pycuda
from tests import host_cuda
from tests.conftest import assert_compiles_without_spills
from edgehebb.resources import cuda_source
from edgehebb.errors import EdgehebbError
from edgehebb.learn.hebbian import currents, init_weights, rank_update, ranking_scores
from edgehebb.learn.loop import LearnConfig, learn, make_backend
from edgehebb.learn.pycuda_backend import KERNEL_FILE, PycudaLearner, kernel_plan, transposed_currents_weights
from edgehebb.learn.patches import PREPROCESS, PatchSampler, preprocess

H100_SHARED = 227 * 1024


def random_images(n=48, size=32, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rel_fro: float | None = None):
    diff = (actual.double() - expected.double()).abs()
    worst = int(diff.argmax())
    where = np.unravel_index(worst, tuple(diff.shape))
    msg = (f"max|diff| {float(diff.max()):.3e} at {tuple(int(i) for i in where)}: "
           f"{float(actual.reshape(-1)[worst])} vs {float(expected.reshape(-1)[worst])}")
    assert float(diff.max()) <= atol, msg
    if rel_fro is not None:
        rel = float(diff.norm() / expected.double().norm())
        assert rel <= rel_fro, f"relative Frobenius error {rel:.3e} > {rel_fro}; {msg}"


# ------------------------------------------------------------------------------------------------
# everywhere


def test_kernel_source_is_found():
    src = cuda_source(KERNEL_FILE)
    assert "hebbian_run" in src and "__global__" in src


def test_unknown_kernel_source_is_one_line_error():
    with pytest.raises(EdgehebbError) as e:
        cuda_source("no_such_kernel.cu")
    assert "\n" not in str(e.value)


def test_plan_for_fig2_left_keeps_weights_resident():
    plan = kernel_plan(filters=400, dim=48, channels=3, kernel=4, stride=1, rank=2, power=2.0,
                       preprocess="none", batch=1000, sms=132, shared_limit=H100_SHARED)
    d = dict(plan.defines)
    assert d["K"] == 400 and d["N"] == 48 and d["TK2"] == 13 and plan.padded_filters == 416
    assert d["NKC"] == 1 and d["NNC"] == 1  # all of Mp in shared memory
    assert plan.shared_bytes <= H100_SHARED and 1 <= plan.blocks <= 132


@pytest.mark.parametrize("batch", [1, 100, 1000, 10000, 100000])
def test_plan_geometry(batch):
    plan = kernel_plan(filters=400, dim=192, channels=3, kernel=8, stride=1, rank=2, power=3.0,
                       preprocess="center-unit", batch=batch, sms=132, shared_limit=H100_SHARED)
    d = dict(plan.defines)
    assert d["NC"] * d["NNC"] >= 192 and plan.shared_bytes <= H100_SHARED
    assert d["TB"] in (1, 2, 4) and 1 <= plan.blocks <= min(132, batch)
    assert d["PRE"] == PREPROCESS.index("center-unit") and d["POW2"] == 0


def test_plan_rejects_bad_overrides():
    common = dict(filters=40, dim=48, channels=3, kernel=4, stride=1, rank=2, power=2.0,
                  preprocess="none", batch=100, sms=8, shared_limit=H100_SHARED)
    with pytest.raises(EdgehebbError):
        kernel_plan(**common, blocks=9)
    with pytest.raises(EdgehebbError):
        kernel_plan(**common, tile=3)
    with pytest.raises(EdgehebbError, match="unknown ranking 'angle'"):
        kernel_plan(**common, rank_by="angle")


def test_plan_ranking_flag():
    common = dict(filters=40, dim=48, channels=3, kernel=4, stride=1, rank=2, power=2.0,
                  preprocess="none", batch=100, sms=8, shared_limit=H100_SHARED)
    assert kernel_plan(**common).define("RANK_COS") == 0
    assert kernel_plan(**common, rank_by="cosine").define("RANK_COS") == 1


@pytest.mark.parametrize("power", [2.0, 3.0])
def test_cosine_mpt_gives_the_oracle_scores(power):
    # phase A's currents against Mp^T as the host writes it are hebbian.ranking_scores("cosine")
    M = init_weights(40, 48, 0)
    v = torch.rand(64, 48, generator=torch.Generator().manual_seed(1))
    mpt = transposed_currents_weights(M.numpy(), power, 64, "cosine")
    assert not mpt[:, 40:].any()
    got = v.double() @ torch.from_numpy(mpt[:, :40]).double()
    want = ranking_scores(M.double(), currents(M.double(), v.double(), power), power, "cosine")
    assert_close(got, want, atol=1e-6 * float(want.abs().max()))


def test_import_leaves_pycuda_unloaded():
    code = "import sys, edgehebb.learn.pycuda_backend; print('pycuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_pycuda_backend_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert learn_pycuda.available() is False
    cfg = LearnConfig(filters=8, batch=10)
    with pytest.raises(EdgehebbError) as e:
        PycudaLearner(random_images(2), cfg, init_weights(8, 48, 0))
    assert "pycuda" in str(e.value) and "pip install" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EdgehebbError):
        make_backend("pycuda", random_images(2), cfg, init_weights(8, 48, 0), "cpu")


def test_without_gpu_backend_is_one_line_error(monkeypatch):
    class Error(Exception):
        pass

    driver = types.SimpleNamespace(init=lambda: None, Device=types.SimpleNamespace(count=lambda: 0), Error=Error)
    fake = types.ModuleType("pycuda")
    fake.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", fake)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(cuda_driver, "_CONTEXTS", {})
    assert learn_pycuda.available() is False
    with pytest.raises(EdgehebbError) as e:
        PycudaLearner(random_images(2), LearnConfig(filters=8, batch=10), init_weights(8, 48, 0))
    assert "GPU" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the kernel")
@pytest.mark.parametrize("kernel,tile,power,rank_by", [(4, 4, 2.0, "current"), (4, 1, 2.0, "current"),
                                                       (8, 2, 2.0, "current"), (4, 4, 2.0, "cosine"),
                                                       (8, 2, 3.0, "cosine")])
def test_kernel_compiles_without_spills(tmp_path, kernel, tile, power, rank_by):
    plan = kernel_plan(filters=400, dim=3 * kernel * kernel, channels=3, kernel=kernel, stride=1, rank=2,
                       power=power, preprocess="none", batch=1000, sms=132, shared_limit=H100_SHARED, tile=tile,
                       rank_by=rank_by)
    assert_compiles_without_spills(KERNEL_FILE, plan.options, tmp_path)


# ------------------------------------------------------------------------------------------------
# the kernel's source on the CPU (tests/host_cuda)


class Parity(NamedTuple):
    bad: int  # patches whose winner or rank-m unit differs from the oracle's away from near-ties
    differ: int  # all patches that differ
    got: torch.Tensor  # host M
    want: torch.Tensor  # oracle M
    reranked: int  # patches whose oracle winner or rank-m unit would differ if ranked by current


def host_vs_oracle(cfg, steps: int, seed: int, images=None, **host_args) -> Parity:
    """Run ``steps`` steps on the host build and on the oracle (``cfg.rank_by`` in both) from the same M."""
    images = random_images(n=12) if images is None else images
    sampler = oracle_setup(images, cfg, "cpu")
    dim = 3 * cfg.kernel ** 2
    M = init_weights(cfg.filters, dim, seed)
    host = host_cuda.HostHebbian(images, cfg, M, **host_args)
    order = torch.randint(0, sampler.n_patches, (steps * cfg.batch,), generator=torch.Generator().manual_seed(seed))
    wins, winners, ranked = host.run_detail(order, 0.02)
    bad = differ = reranked = 0
    for t in range(steps):
        v = preprocess(sampler.gather(order[t * cfg.batch:(t + 1) * cfg.batch]), cfg.preprocess)
        tie = near_tie(M, v, cfg.power, cfg.rank, cfg.rank_by)
        by_current = torch.topk(currents(M, v, cfg.power), cfg.rank, dim=1).indices
        ref = rank_update(M, v, 0.02, cfg.power, cfg.delta, cfg.rank, cfg.rank_by)
        d = (winners[t] != ref.winners) | (ranked[t] != ref.ranked)
        bad, differ = bad + int((d & ~tie).sum()), differ + int(d.sum())
        reranked += int(((by_current[:, 0] != ref.winners) | (by_current[:, -1] != ref.ranked)).sum())
    assert torch.equal(wins, torch.bincount(winners.flatten(), minlength=cfg.filters))
    return Parity(bad, differ, host.weights(), M, reranked)


@pytest.mark.parametrize("pre,power,rank,kernel", [("center-unit", 2.0, 2, 4), ("none", 2.0, 2, 3),
                                                   ("unit", 3.0, 3, 4), ("center", 2.0, 2, 5)])
def test_host_build_same_winners_and_weights_as_oracle(pre, power, rank, kernel):
    cfg = LearnConfig(filters=40, kernel=kernel, batch=96, power=power, rank=rank, preprocess=pre)
    bad, _, got, want, _ = host_vs_oracle(cfg, steps=4, seed=1)
    assert bad == 0
    assert_close(got, want, atol=1e-5)


@pytest.mark.parametrize("pre,power,rank,kernel", [("unit", 2.0, 2, 4), ("center-unit", 3.0, 3, 4),
                                                   ("center-unit", 2.0, 3, 8), ("unit", 3.0, 2, 8)])
def test_host_build_ranks_by_cosine_as_the_oracle(pre, power, rank, kernel):
    # standard-normal rows differ in norm by ~10 %, so ranking by cosine changes many winners: the
    # kernel must rank as the oracle does and still update with the true currents
    cfg = LearnConfig(filters=40, kernel=kernel, batch=96, power=power, rank=rank, preprocess=pre, rank_by="cosine")
    r = host_vs_oracle(cfg, steps=4, seed=1)
    bad, differ, reranked = r.bad, r.differ, r.reranked
    assert reranked > 0.2 * 4 * cfg.batch   # the test tells the rankings apart
    assert bad == 0, f"{bad} patches differ away from near-ties ({differ} in all)"
    assert_close(r.got, r.want, atol=1e-5)


def test_host_build_non_resident_tiles_match_the_oracle():
    # 24 KB of shared memory: Mp^T (75 x 832 floats) is streamed in 2 K chunks x 7 n chunks every round
    cfg = LearnConfig(filters=500, kernel=5, batch=64, preprocess="center-unit")
    bad, _, got, want, _ = host_vs_oracle(cfg, steps=3, seed=2, tile=1, shared_limit=24 * 1024)
    assert bad == 0
    assert_close(got, want, atol=1e-5)


@pytest.mark.parametrize("pre", ["center", "center-unit"])
def test_host_build_flat_images_leave_the_weights_alone(pre):
    # flat patches centre to exactly zero in the kernel as in the oracle, so they move nothing; with
    # a float32 mean their rounding noise used to drive updates (at level 162, say)
    images = np.full((12, 32, 32, 3), 162, np.uint8)
    cfg = LearnConfig(filters=40, kernel=4, batch=96, preprocess=pre)
    bad, _, got, want, _ = host_vs_oracle(cfg, steps=2, seed=1, images=images)
    M0 = init_weights(cfg.filters, 48, 1)
    assert bad == 0 and torch.equal(got, M0) and torch.equal(want, M0)


@pytest.mark.parametrize("power,rank_by", [(2.0, "current"), (3.0, "cosine")])   # p = 3: every RANK_COS path
def test_host_build_bitwise_independent_of_grid_and_tile(power, rank_by):
    images = random_images(n=12)
    cfg = LearnConfig(filters=40, kernel=4, batch=80, preprocess="center", power=power, rank_by=rank_by)
    M0 = init_weights(cfg.filters, 48, 5)
    order = torch.randint(0, 12 * 29 * 29, (6 * cfg.batch,), generator=torch.Generator().manual_seed(6))
    runs = []
    for blocks, tile, limit in [(2, None, H100_SHARED), (1, 4, H100_SHARED), (3, 1, H100_SHARED), (2, 2, 10 * 1024)]:
        host = host_cuda.HostHebbian(images, cfg, M0, blocks=blocks, tile=tile, shared_limit=limit)
        assert host.plan.define("RANK_COS") == (rank_by == "cosine")
        wins, _, _ = host.run_detail(order, 0.02)
        runs.append((wins, host.weights(), host.plan.defines))
    for wins, M, plan in runs[1:]:
        assert torch.equal(wins, runs[0][0]), plan
        assert torch.equal(M, runs[0][1]), plan


def test_host_build_barrier_times_out_instead_of_hanging():
    # room for one of the two blocks: block 0 waits at the first barrier for a block that cannot start
    # until it leaves, gives up, sets the fault word; block 1 then starts, sees it and does nothing
    images = random_images(n=12)
    cfg = LearnConfig(filters=40, kernel=4, batch=80)
    M0 = init_weights(cfg.filters, 48, 3)
    host = host_cuda.HostHebbian(images, cfg, M0, blocks=2, resident=1, barrier_timeout_s=0.2)
    order = torch.randint(0, 12 * 29 * 29, (3 * cfg.batch,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(EdgehebbError, match=r"grid barrier waited over 0\.2 s, so its 2 blocks") as e:
        host.run_detail(order, 0.02)
    assert "\n" not in str(e.value) and "--resume" in str(e.value)
    assert torch.equal(host.weights(), M0)  # no step finished, so M is untouched
    assert host.barrier[1] == 1
    # a later launch on the faulted grid returns at once and reports it again
    host.resident = -1
    with pytest.raises(EdgehebbError, match="grid barrier"):
        host.run_detail(order, 0.02)
    assert torch.equal(host.weights(), M0)


# ------------------------------------------------------------------------------------------------
# on a GPU


@pytest.fixture
def gpu():
    if not learn_pycuda.available():
        pytest.skip("needs pycuda, an NVIDIA GPU and nvcc")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for the oracle on the same device")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle in full float32
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = old


def near_tie(M: torch.Tensor, v: torch.Tensor, power: float, rank: int, rank_by: str = "current",
             tol=1e-5) -> torch.Tensor:
    """Patches whose top-1/top-2 or rank-m/rank-(m+1) ranking scores (currents, or cosines for
    ``rank_by="cosine"``) are within ``tol`` (float64)."""
    Md = M.double()
    h = ranking_scores(Md, currents(Md, v.double(), power), power, rank_by)
    top = torch.topk(h, min(rank + 1, h.shape[1]), dim=1).values
    scale = top.abs().max(dim=1).values.clamp_min(1e-30)
    close = (top[:, 0] - top[:, 1]) / scale < tol
    if top.shape[1] > rank:
        close |= (top[:, rank - 1] - top[:, rank]) / scale < tol
    return close


def oracle_setup(images, cfg, device):
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    return PatchSampler(nchw, cfg.kernel, cfg.stride)


@pytest.mark.gpu
@pytest.mark.parametrize("pre,power,rank,kernel,rank_by", [
    ("none", 2.0, 2, 4, "current"), ("center", 2.0, 2, 4, "current"), ("unit", 3.0, 2, 4, "current"),
    ("center-unit", 2.0, 3, 4, "current"),
    ("unit", 2.0, 2, 4, "cosine"), ("center-unit", 3.0, 3, 4, "cosine"), ("center-unit", 2.0, 3, 8, "cosine"),
    ("unit", 3.0, 2, 8, "cosine")])
def test_same_winners_as_oracle_every_patch(gpu, pre, power, rank, kernel, rank_by):
    # each step starts from the kernel's own M and the Mp^T its phase C wrote (scaled for cosine)
    images = random_images()
    cfg = LearnConfig(filters=400, kernel=kernel, batch=1000, power=power, rank=rank, preprocess=pre,
                      rank_by=rank_by)
    sampler = oracle_setup(images, cfg, gpu)
    backend = PycudaLearner(images, cfg, init_weights(cfg.filters, 3 * kernel ** 2, 1))
    gen = torch.Generator().manual_seed(2)
    ties = 0
    for step in range(5):
        order = torch.randint(0, sampler.n_patches, (cfg.batch,), generator=gen)
        M_gpu = backend.weights().to(gpu)
        wins, winners, ranked = backend.run_detail(order, 0.02)
        v = preprocess(sampler.gather(order.to(gpu)), pre)
        tie = near_tie(M_gpu, v, power, rank, rank_by).cpu()
        ref = rank_update(M_gpu, v, 0.02, power, cfg.delta, rank, rank_by)
        differ = (winners[0] != ref.winners.cpu()) | (ranked[0] != ref.ranked.cpu())
        assert not (differ & ~tie).any(), f"step {step}: {int((differ & ~tie).sum())} patches differ away from ties"
        ties += int(differ.sum())
        assert torch.equal(wins, torch.bincount(winners[0], minlength=cfg.filters))
        assert_close(backend.weights(), M_gpu.cpu(), atol=1e-5)
    print(f"\n{pre} p={power} m={rank} W={kernel} {rank_by}: {ties} near-tie mismatches in {5 * cfg.batch} patches")


@pytest.mark.gpu
@pytest.mark.parametrize("rank_by", ["current", "cosine"])
def test_weights_close_to_oracle_after_100_steps(gpu, rank_by):
    # float32 vs float64 on CPU, 100 steps: max|dM| 2e-6 with either ranking (no near-tie flips)
    images = random_images()
    cfg = LearnConfig(filters=400, kernel=4, batch=1000, rank_by=rank_by)
    sampler = oracle_setup(images, cfg, gpu)
    M0 = init_weights(cfg.filters, 48, 3)
    backend = PycudaLearner(images, cfg, M0)
    order = torch.randint(0, sampler.n_patches, (100 * cfg.batch,), generator=torch.Generator().manual_seed(4))
    backend.run(order, 0.02)
    M = M0.to(gpu)
    for step in range(100):
        v = preprocess(sampler.gather(order[step * cfg.batch:(step + 1) * cfg.batch].to(gpu)), cfg.preprocess)
        rank_update(M, v, 0.02, cfg.power, cfg.delta, cfg.rank, cfg.rank_by)
    got, want = backend.weights(), M.cpu()
    diff = (got - want).abs()
    print(f"\n100 steps, {rank_by}: max|dM| {float(diff.max()):.2e}, "
          f"relative Frobenius {float(diff.norm() / want.norm()):.2e}")
    assert_close(got, want, atol=1e-2, rel_fro=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("power,rank_by", [(2.0, "current"), (3.0, "cosine")])
def test_results_independent_of_launch_configuration(gpu, power, rank_by):
    images = random_images()
    cfg = LearnConfig(filters=400, kernel=4, batch=1000, preprocess="center", power=power, rank_by=rank_by)
    M0 = init_weights(cfg.filters, 48, 5)
    order = torch.randint(0, 48 * 29 * 29, (64 * cfg.batch,), generator=torch.Generator().manual_seed(6))
    results = []
    for blocks, tile in [(None, None), (1, 4), (7, 1), (32, 2), (None, 4)]:
        backend = PycudaLearner(images, cfg, M0, blocks=blocks, tile=tile)
        wins = backend.run(order, 0.02)
        results.append((backend.kernel_info, wins, backend.weights()))
    info0, wins0, M_0 = results[0]
    for info, wins, M in results[1:]:
        assert torch.equal(wins, wins0), (info, info0)
        assert torch.equal(M, M_0), (info, info0)  # bitwise
    # one call (split into several launches) or one call per step: the same bits
    stepwise = PycudaLearner(images, cfg, M0)
    wins = sum(stepwise.run(order[i * cfg.batch:(i + 1) * cfg.batch], 0.02) for i in range(64))
    assert torch.equal(wins, wins0) and torch.equal(stepwise.weights(), M_0)


@pytest.mark.gpu
@pytest.mark.parametrize("rank_by", ["current", "cosine"])
def test_full_run_learns_the_same_filters_as_torch_cuda(gpu, rank_by):
    images = random_images(n=40)
    cfg = LearnConfig(filters=64, kernel=4, epochs=2, batch=500, lr=0.02, seed=7, rank_by=rank_by)
    fast = learn(images, cfg, backend="pycuda", progress=False)
    ref = learn(images, cfg, backend="torch", device="cuda", progress=False)
    diff = (fast.weights - ref.weights).abs()
    print(f"\nfull run ({cfg.epochs} epochs): max|dM| {float(diff.max()):.2e}, "
          f"relative Frobenius {float(diff.norm() / ref.weights.norm()):.2e}")
    assert_close(fast.weights, ref.weights, atol=1e-2, rel_fro=1e-3)
    for a, b in zip(fast.history, ref.history):
        assert abs(a.norm_error - b.norm_error) < 1e-3


@pytest.mark.gpu
def test_barrier_times_out_when_the_grid_is_not_resident(gpu):
    # twice as many blocks as multiprocessors, each needing most of one's shared memory: half of them
    # cannot start until the others leave, so the barrier must report a fault rather than hang
    cuda = cuda_driver.driver()
    ctx = cuda_driver.context(0)
    with cuda_driver.Active(ctx):
        dev, attr = ctx.get_device(), cuda.device_attribute
        sms, limit = dev.get_attribute(attr.MULTIPROCESSOR_COUNT), dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        plan = kernel_plan(filters=400, dim=48, channels=3, kernel=4, stride=1, rank=2, power=2.0,
                           preprocess="none", batch=1000, sms=sms, shared_limit=limit, barrier_timeout_s=0.5)
        fn = learn_pycuda._module(0, plan).get_function("grid_sync_bench")
        fn.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, limit)
        words = cuda.mem_alloc(8)
        cuda.memset_d32(words, 0, 2)
        fn(words, np.int32(4), block=(plan.threads, 1, 1), grid=(2 * sms, 1), shared=limit)
        cuda.Context.synchronize()
        host = np.empty(2, np.uint32)
        cuda.memcpy_dtoh(host, words)
    assert host[1] == 1
    with pytest.raises(EdgehebbError, match="grid barrier waited over 0.5 s"):
        learn_pycuda.check_barrier(host, plan)
