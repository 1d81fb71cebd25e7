"""The fused NNL-CONV kernel (cuda/nnl_forward.cu via edgehebb.deploy.fused) against the torch layer.

CPU: the launch plan, the filters the kernel reads, the one-line errors, and (with nvcc) that every
variant compiles without register spills. GPU (marker ``gpu``, skipped without pycuda, a GPU and
nvcc): the kernel against ``nnl.NNLConv`` evaluated in float64 on the same device.

The kernel also runs without a GPU: tests/host_cuda compiles the same .cu source with g++ against a
shim that makes every CUDA thread an OS thread (barriers, atomics, shared memory emulated), so CI
checks its indexing, pooling windows, barriers and arithmetic; only speed and GPU-specific hazards
need the GPU tests. Without g++ these host-build tests fail (tests/host_cuda); they are not skipped.

Tolerances. Pooled cosines (features ** (1 / n)): within 1e-5 absolute of float64 where the float64
feature is >= 1e-30 (below, float32's c^n underflows; such features must be <= 1e-29). The kernel
computes each cosine as one float32 dot product of centred values over |d| + eps, like the op's
function body; measured worst 3e-5 x n relative on the features. Logits: within 1e-4 of each row's largest |logit| and >= 99.9 % top-1 agreement (OP_SPEC.md).
Different launch shapes (kc, threads, nch) give bitwise the same features: each cosine is one fixed-order
fmaf chain and pooling is a max.
"""

from __future__ import annotations

import dataclasses

import shutil
import sys

import pytest
import torch

from edgehebb import cuda_driver
from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from tests import host_cuda
from tests.conftest import assert_compiles_without_spills
from edgehebb.errors import EdgehebbError
from edgehebb.nnl.model import load_model, shipped_models
from edgehebb.nnl import BlockSpec, NetSpec, NNLNet, load_spec
from edgehebb.deploy.fused import KERNEL_FILE, FusedNet, block_launches, fused_plan, kernel_filters
from edgehebb.nnl.train import fit_standardiser
from tests.test_onnx_export import patch_filters

H100_SHARED = 232448  # opt-in shared memory per block on an H100

BLOCKS = {
    "fig2_left": BlockSpec(kernel=4, filters=400, power=40.0, pool=11, pool_stride=9),
    "w3": BlockSpec(kernel=3, filters=400, power=55.0, pool=12, pool_stride=9, center=True),
    "w8": BlockSpec(kernel=8, filters=400, power=20.0, pool=9, pool_stride=8),
    "stride_pad_plain": BlockSpec(kernel=5, filters=24, power=10.0, pool=3, pool_stride=2, stride=2, padding=1,
                                  center=False),
    "gaps": BlockSpec(kernel=3, filters=40, power=30.0, pool=2, pool_stride=5, center=True),  # positions outside every window
}


# ------------------------------------------------------------------------------------------------
# CPU


def test_default_plan_for_the_paper_blocks():
    for block in load_spec("fig2_middle").blocks:
        plan = fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED)
        assert (plan.define("KC"), plan.threads, plan.chunks, plan.define("KPAD")) == (80, 160, 5, 400)
        assert 2 * (plan.shared_bytes + 1024) <= H100_SHARED + 1024  # two thread blocks per multiprocessor
        n, nch = 3 * block.kernel ** 2, plan.define("NCH")
        if nch < n:  # the largest chunk that keeps two blocks per multiprocessor
            wider = fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED, nch=nch + 1)
            assert 2 * (wider.shared_bytes + 1024) > H100_SHARED + 1024
    left = fused_plan(BLOCKS["fig2_left"], (3, 32, 32), shared_limit=H100_SHARED)
    assert [left.define(k) for k in ("HO", "WO", "HP", "WP", "NCH", "CENTER")] == [29, 29, 3, 3, 48, 0]


def test_plan_shapes_and_errors():
    block = BLOCKS["fig2_left"]
    plan = fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED, kc=64, nch=16)
    assert (plan.threads, plan.chunks, plan.define("KPAD"), plan.define("NCH")) == (128, 7, 448, 16)
    small = fused_plan(BlockSpec(kernel=3, filters=10, power=2.0, pool=2, pool_stride=2), (1, 8, 8), shared_limit=H100_SHARED)
    assert small.define("KPAD") >= 10 and small.define("KPAD") % small.define("KC") == 0
    with pytest.raises(EdgehebbError, match="norm=false"):
        fused_plan(BlockSpec(kernel=4, filters=8, power=2.0, pool=2, pool_stride=2, norm=False), (3, 32, 32), shared_limit=H100_SHARED)
    with pytest.raises(EdgehebbError, match="multiple of 8"):
        fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED, kc=12)
    with pytest.raises(EdgehebbError, match="multiple of 32"):
        fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED, kc=80, threads=128)
    with pytest.raises(EdgehebbError, match="nch"):
        fused_plan(block, (3, 32, 32), shared_limit=H100_SHARED, nch=49)
    with pytest.raises(EdgehebbError, match="shared memory; choose a smaller kc"):
        fused_plan(block, (3, 32, 32), shared_limit=20000)
    fused_plan(block, (3, 32, 32), shared_limit=20000, kc=8, threads=32)   # as the message says


def test_a_whitened_image_too_large_for_shared_memory_says_so():
    # the wide model's kernel reads a 48 x 29 x 29 whitened image (158 KiB): an H100 (227 KiB) plans it, a
    # Jetson Orin (163 KiB a block) cannot, whatever the kc
    net, _ = load_model("fig2_left_wide-cifar10")
    (launch,) = block_launches(net, H100_SHARED)
    assert launch.plan.shared_bytes <= H100_SHARED
    with pytest.raises(EdgehebbError, match=r"48x29x29 input image alone takes 161472 bytes: run this model with torch"):
        block_launches(net, 163 * 1024)


def test_kernel_filters_are_the_centred_unit_filters_transposed():
    spec = NetSpec("t", (BLOCKS["stride_pad_plain"], BlockSpec(kernel=3, filters=10, power=5.0, pool=2, pool_stride=2,
                                                                center=True)),
                   input=(3, 12, 12))
    g = torch.Generator().manual_seed(0)
    net = NNLNet(spec, [torch.randn(b.filters, 3, b.kernel, b.kernel, generator=g) for b in spec.blocks])
    plain, centred = net.blocks
    t = kernel_filters(plain, 32)
    assert t.shape == (75, 32) and t.dtype == torch.float32 and t.is_contiguous()
    torch.testing.assert_close(t[:, :24], plain.weight.flatten(1).T, rtol=0, atol=0)
    assert t[:, 24:].abs().max() == 0
    u = kernel_filters(centred, 16)
    torch.testing.assert_close(u[:, :10].sum(0), torch.zeros(10), rtol=0, atol=1e-6)   # centred
    ref = centred.weight.flatten(1) - centred.weight.flatten(1).mean(1, keepdim=True)
    torch.testing.assert_close(u[:, :10], ref.T, rtol=0, atol=1e-7)


def test_fused_net_without_pycuda_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    net = NNLNet(NetSpec("t", (BLOCKS["fig2_left"],)), [torch.randn(400, 3, 4, 4)])
    with pytest.raises(EdgehebbError) as e:
        FusedNet(net)
    assert "pycuda" in str(e.value) and "pip install" in str(e.value) and "\n" not in str(e.value)


def test_fused_net_refuses_cpu_networks_and_conv_twins(monkeypatch):
    from edgehebb.nnl import ConvNet

    import edgehebb.deploy.fused as nnl_fused

    spec = NetSpec("t", (BLOCKS["fig2_left"],))
    monkeypatch.setattr(nnl_fused, "driver", lambda why: None)   # as if pycuda were installed
    with pytest.raises(EdgehebbError, match="CUDA device"):
        FusedNet(NNLNet(spec, [torch.randn(400, 3, 4, 4)]))
    with pytest.raises(EdgehebbError, match="standard convolutions"):
        FusedNet(ConvNet(spec))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the kernel")
@pytest.mark.parametrize("name,kc,threads", [("fig2_left", None, None), ("w3", None, None), ("w8", None, None),
                                             ("stride_pad_plain", None, None), ("fig2_left", 64, 256),
                                             ("w8", 128, 256)])
def test_kernel_compiles_without_spills(tmp_path, name, kc, threads):
    plan = fused_plan(BLOCKS[name], (3, 32, 32), shared_limit=H100_SHARED, kc=kc, threads=threads)
    assert_compiles_without_spills(KERNEL_FILE, plan.options, tmp_path)


# ------------------------------------------------------------------------------------------------
# on a GPU


@pytest.fixture
def gpu():
    if not cuda_driver.available():
        pytest.skip("needs pycuda, an NVIDIA GPU and nvcc")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for the reference on the same device")
    return torch.device("cuda")


def images(n: int, shape=(3, 32, 32), seed=0) -> torch.Tensor:
    """Smooth random images with flat and low-contrast regions (the cases the patch norm is hard on)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, shape[0], shape[1] // 4, shape[2] // 4, generator=g),
                                        size=shape[1:], mode="bilinear", align_corners=False)
    x[: n // 4, :, : shape[1] // 2] = 0.5                                   # flat
    x[n // 4: n // 2] = 0.5 + (x[n // 4: n // 2] - 0.5) / 64               # low contrast
    return (torch.round(x * 255) / 255).contiguous()


def reference_net(spec: NetSpec, seed: int) -> NNLNet:
    x = images(32, spec.input, seed + 100)
    return NNLNet(spec, patch_filters(x, spec, seed)).eval()


def assert_features_close(got: torch.Tensor, ref: torch.Tensor, spec: NetSpec) -> None:
    """Pooled cosines (features ** (1/n)) within 1e-5 where the float64 feature is >= 1e-30; below
    that, float32's c^n underflows (c^40 < 1e-38 once c < 0.11), so only got <= 1e-29 is asked."""
    at = 0
    for b in spec.blocks:
        h, w = b.out_size(*spec.input[1:])
        g, r = got[:, at:at + b.filters * h * w].double(), ref[:, at:at + b.filters * h * w].double()
        at += b.filters * h * w
        big = r >= 1e-30
        assert not torch.isnan(g).any(), "NaN: a feature was never written"
        assert g[~big].abs().max().item() <= 1e-29 if (~big).any() else True
        dc = (g[big] ** (1 / b.power) - r[big] ** (1 / b.power)).abs().max().item()
        assert dc <= 1e-5, f"{b}: pooled cosines differ by {dc}"
    assert at == got.shape[1] == ref.shape[1]


def float64_features(net: NNLNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = net.double().features(x.double())
    net.float()  # float32 -> float64 -> float32 is exact: the network is unchanged
    return ref


# ------------------------------------------------------------------------------------------------
# the kernel's own source, built for the CPU (tests/host_cuda: every CUDA thread an OS thread)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_host_build_matches_float64_torch(name):
    spec = NetSpec(name, (BLOCKS[name],), input=(3, 32, 32))
    net = reference_net(spec, 1)
    x = images(6)
    assert_features_close(host_cuda.nnl_features(net, x, H100_SHARED), float64_features(net, x), spec)


def test_host_build_runs_a_patch_norm_conv_twin_with_its_own_power():
    # ConvNet(patch_norm=True) gives every block the net's power (3 here), not the spec's (30, 10)
    from edgehebb.nnl import ConvNet

    spec = NetSpec("two", (BLOCKS["gaps"], BLOCKS["stride_pad_plain"]), input=(3, 32, 32))
    torch.manual_seed(3)
    net = ConvNet(spec, power=3.0, patch_norm=True).eval()
    x = images(3)
    got, ref = host_cuda.nnl_features(net, x, H100_SHARED), float64_features(net, x)
    assert_features_close(got, ref, NetSpec("two", tuple(dataclasses.replace(b, power=3.0) for b in spec.blocks),
                                            input=(3, 32, 32)))


# the op's options (issue 15): sigma on both blocks (0.3 beside |v| ~ 1-5 of these patches, and the
# padded block's partly black border), gray-world colour normalisation before them
OPTIONS = NetSpec("options", (dataclasses.replace(BLOCKS["gaps"], sigma=0.3),
                              dataclasses.replace(BLOCKS["stride_pad_plain"], sigma=1.0)),
                  input=(3, 32, 32), colour_norm="gray-world")


def test_host_build_with_sigma_and_colour_norm_matches_float64_torch():
    net = reference_net(OPTIONS, 4)
    x = images(6) * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)      # a colour cast for gray-world to undo
    assert_features_close(host_cuda.nnl_features(net, x, H100_SHARED), float64_features(net, x), OPTIONS)


def test_host_build_launch_shape_does_not_change_a_bit():
    spec = NetSpec("two", (BLOCKS["gaps"], BLOCKS["stride_pad_plain"]), input=(3, 32, 32))
    net = reference_net(spec, 2)
    x = images(3)
    base = host_cuda.nnl_features(net, x, H100_SHARED)
    for shape in (dict(kc=64, threads=128), dict(kc=16, threads=64, nch=5), dict(kc=8, threads=32, nch=1)):
        assert torch.equal(host_cuda.nnl_features(net, x, H100_SHARED, **shape), base), shape


@pytest.mark.parametrize("model", shipped_models())
def test_host_build_logits_of_the_shipped_models_match_float64(model):
    net, _ = load_model(model)
    x = images(4)
    feats = host_cuda.nnl_features(net, x, H100_SHARED)
    with torch.no_grad():
        ref = net.double()(x.double())
        got = net.float().classify(feats).double()
    rel = parity_error(got, ref).max()
    assert rel <= PARITY_TOLERANCE, rel
    assert torch.equal(got.argmax(1), ref.argmax(1))


# a whitened block (issue 24): torch whitens the patches into an N-channel image, the kernel runs 1 x 1 on it;
# padded and strided, so the whitening convolution carries both and the kernel neither
WHITENED = NetSpec("whitened", (BlockSpec(kernel=4, filters=24, power=5.0, pool=3, pool_stride=2, stride=2, padding=1,
                                          whiten=0.1),), input=(3, 16, 16), colour_norm="gray-world")


def whitened_net(seed: int) -> NNLNet:
    g = torch.Generator().manual_seed(seed)
    net = NNLNet(WHITENED, [(torch.randn(24, 48, 1, 1, generator=g), torch.randn(48, 3, 4, 4, generator=g))]).eval()
    with torch.no_grad():
        fit_standardiser(net, net.features(images(16, WHITENED.input, seed + 100)).numpy())
    return net


def test_host_build_of_a_whitened_block_matches_float64_torch():
    net = whitened_net(5)
    (launch,) = block_launches(net, H100_SHARED)
    assert launch.plan.define("CH") == 48 and launch.plan.define("KW") == 1 and launch.plan.define("PAD") == 0
    x = images(6, WHITENED.input) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    got = host_cuda.nnl_features(net, x, H100_SHARED)
    assert_features_close(got, float64_features(net, x), WHITENED)
    with torch.no_grad():
        rel = parity_error(net.classify(got).double(), net.double()(x.double())).max()
    net.float()
    assert rel <= PARITY_TOLERANCE, rel


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BLOCKS))
def test_features_match_float64_torch(gpu, name):
    spec = NetSpec(name, (BLOCKS[name],), input=(3, 32, 32))
    net = reference_net(spec, 1).to(gpu)
    x = images(64).to(gpu)
    ref = float64_features(net, x)
    got = FusedNet(net).features(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert_features_close(got, ref, spec)


@pytest.mark.gpu
def test_features_with_sigma_and_colour_norm_match_float64_torch(gpu):
    net = reference_net(OPTIONS, 4).to(gpu)
    x = (images(16) * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)).to(gpu)
    assert_features_close(FusedNet(net).features(x), float64_features(net, x), OPTIONS)


@pytest.mark.gpu
def test_whitened_block_matches_float64_torch_on_a_side_stream(gpu):
    # the whitening convolution runs in torch on its current stream, the kernel on the legacy default one
    net = whitened_net(5).to(gpu)
    x = (images(16, WHITENED.input) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)).to(gpu)
    fused = FusedNet(net)
    assert_features_close(fused.features(x), float64_features(net, x), WHITENED)
    side = torch.cuda.Stream(gpu)
    with torch.cuda.stream(side):
        got = fused.features(x)
    side.synchronize()
    assert_features_close(got, float64_features(net, x), WHITENED)


@pytest.mark.gpu
def test_launch_shape_does_not_change_a_bit(gpu):
    spec = NetSpec("two", (BLOCKS["fig2_left"], BLOCKS["w8"]), input=(3, 32, 32))
    net = reference_net(spec, 2).to(gpu)
    x = images(17).to(gpu)
    base = FusedNet(net).features(x)
    for kc, threads, nch in ((64, 128, None), (128, 256, 7), (16, 64, 1), (96, 192, 20)):
        assert torch.equal(FusedNet(net, kc=kc, threads=threads, nch=nch).features(x), base), (kc, threads, nch)


@pytest.mark.gpu
def test_logits_of_a_trained_model_match_float64(gpu):
    net, _ = load_model("fig2_left-cifar10", gpu)
    x = images(256).to(gpu)
    with torch.no_grad():
        ref = net.double()(x.double())
        got = FusedNet(net.float())(x).double()
    rel = parity_error(got, ref).max()
    assert rel <= PARITY_TOLERANCE, rel
    assert (got.argmax(1) == ref.argmax(1)).double().mean().item() >= 0.999


@pytest.mark.gpu
def test_multi_block_network_with_a_standardised_head(gpu):
    spec = load_spec("fig2_middle")
    net = reference_net(spec, 3).to(gpu)
    x = images(96).to(gpu)
    with torch.no_grad():
        fit_standardiser(net, net.features(x).cpu().numpy())
        ref = net.double()(x.double())
        got = FusedNet(net.float())(x).double()
    rel = parity_error(got, ref).max()
    assert rel <= PARITY_TOLERANCE, rel


@pytest.mark.gpu
def test_side_stream_batch_zero_and_bad_input(gpu):
    net = reference_net(NetSpec("s", (BLOCKS["gaps"],), input=(3, 32, 32)), 4).to(gpu)
    fused = FusedNet(net)
    x = images(8).to(gpu)
    base = fused.features(x)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = x * 1.0                                  # produced on the side stream
        on_side = fused.features(y)
    torch.cuda.synchronize()
    assert torch.equal(on_side, base)
    assert fused.features(x[:0]).shape == (0, base.shape[1])
    with pytest.raises(EdgehebbError, match="float32"):
        fused.features(x.double())
    with pytest.raises(EdgehebbError, match="float32"):
        fused.features(x.cpu())
    with pytest.raises(EdgehebbError, match="float32"):
        fused.features(x[:, :2])
