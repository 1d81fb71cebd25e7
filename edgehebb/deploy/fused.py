"""NNL-CONV inference through the fused kernel (cuda/nnl_forward.cu), launched with PyCUDA.

Each patch-normalised block of a network runs as one kernel that never writes its cosine map: it
pools in shared memory and writes only the pooled outputs, straight into their columns of the
(B, features) matrix. Standardisation and the head stay in torch. The kernel computes what
``nnl.NNLConv`` computes (the op of export/OP_SPEC.md); ``tests/test_nnl_fused.py -m gpu`` checks it
against the network evaluated in float64.

    fused = FusedNet(net.cuda())       # an NNLNet (or a ConvNet with patch_norm) on a CUDA device
    logits = fused(x)                  # x: float32 (B, C, H, W) on that device, [0, 1]

Launches go to the legacy default stream of the network's device. When torch's current stream is
another one, it is synchronised before and after (correct, a little slower). pycuda and nvcc are
needed at construction; without them the error says what to install.

The op's options (OP_SPEC.md, version 2): a block's ``sigma`` reaches the kernel as the argument
``sigma2`` (0 for sigma 0, which adds nothing); the net's ``colour_norm`` runs in torch before the
launches. A whitened block (``whiten``, OP_SPEC.md) runs as the exported graph does: its whitening
convolution in torch (IEEE FP32), then the kernel on that (B, N, H', W') output with 1 x 1 filters,
stride 1 and no padding.

Status: the kernel has been checked on the CPU through a g++ build of the same source
(tests/host_cuda), not yet on a GPU; the GPU tests are written and skip without one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from edgehebb.cuda_driver import Active, compiled_module, context, driver
from edgehebb.errors import EdgehebbError
from edgehebb.nnl.spec import BlockSpec
from edgehebb.nnl.layers import NNLConv, Net, colour_normalise
from edgehebb.resources import cuda_source

KERNEL_FILE = "nnl_forward.cu"
FALLBACK = "run the model with torch instead"
# (filters per thread block, threads): a thread owns 8 positions x 8 filters, so KC / 8 threads
# span a row of filters and threads must be a multiple of both 32 and KC / 8.
SHAPES = ((80, 160), (64, 128), (96, 192), (128, 256), (48, 96), (32, 128), (16, 64), (8, 32))
SMALLEST = (8, 32)   # the least shared memory a plan can take: 8 filters, one warp (256 positions)


@dataclass(frozen=True)
class FusedPlan:
    """Compile-time constants and launch geometry of the kernel for one block."""

    defines: tuple[tuple[str, int], ...]
    chunks: int          # thread blocks per image (grid y)
    threads: int
    shared_bytes: int

    def define(self, name: str) -> int:
        return dict(self.defines)[name]

    @property
    def options(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in self.defines]


def _shared_bytes(channels: int, hpad: int, wpad: int, dim: int, kc: int, tpos: int, nch: int, cells: int) -> int:
    img = (channels * hpad * wpad + 3) // 4 * 4
    # image, Mc^T chunk, As tile, four notes per position (mean, 1/den, patch offset, cells), the
    # patch offset table, pooled maxima: the carve-up at the top of nnl_forward
    return 4 * (img + dim * kc + nch * tpos + 4 * tpos + dim + cells * kc)


def fused_plan(block: BlockSpec, input_shape: tuple[int, int, int], *, shared_limit: int,
               kc: int | None = None, threads: int | None = None, nch: int | None = None) -> FusedPlan:
    """The kernel's constants for ``block`` on images of ``input_shape`` (C, H, W).

    ``kc`` (filters per thread block), ``threads`` and ``nch`` (patch values per shared tile) override
    the defaults, e.g. in tests and benchmarks; results do not depend on them. Default: the shape in
    ``SHAPES`` that pads K least (400 -> 80), and the largest ``nch`` that lets two thread blocks
    share a multiprocessor (``shared_limit``: opt-in shared memory per block, bytes).
    """
    if not block.norm:
        raise EdgehebbError("the fused kernel computes patch-normalised blocks only (norm=true); "
                            "this block has norm=false")
    c, h, w = input_shape
    K, dim = block.filters, c * block.kernel ** 2
    if kc is None:
        kc, threads_default = min(SHAPES, key=lambda s: (math.ceil(K / s[0]) * s[0], -s[0]))
        threads = threads or threads_default
    if kc % 8 or kc < 8:
        raise EdgehebbError(f"kc must be a positive multiple of 8, got {kc}")
    tx = kc // 8
    if threads is None:  # the listed shape for this kc, else the first whole multiple of 32 and tx >= 128
        threads = dict(SHAPES).get(kc) or next(t for t in range(128, 1025 + 32 * tx, 32) if t % tx == 0)
    if threads % 32 or threads % tx or threads > 1024:
        raise EdgehebbError(f"threads must be a multiple of 32 and of kc/8 = {tx}, at most 1024; got {threads}")
    tpos = 8 * (threads // tx)
    mh, mw = block.map_size(h, w)
    ph, pw = block.out_size(h, w)
    hpad, wpad = h + 2 * block.padding, w + 2 * block.padding

    def size(n: int) -> int:
        return _shared_bytes(c, hpad, wpad, dim, kc, tpos, n, ph * pw)

    if nch is None:
        # two per multiprocessor: the SM holds the opt-in limit + 1 KB, and each block reserves 1 KB
        half = (shared_limit + 1024) // 2 - 1024
        fits = [n for n in range(dim, 0, -1) if size(n) <= half] or \
               [n for n in range(dim, 0, -1) if size(n) <= shared_limit]
        if not fits:
            image = 4 * ((c * hpad * wpad + 3) // 4 * 4)
            # the kernel holds the whole (padded) input image in shared memory: a smaller kc helps only when
            # the image leaves room for the smallest plan (SMALLEST: one value a tile); the wide model's
            # whitened 48x29x29 image (158 KiB) does not on a Jetson Orin (163 KiB)
            kc_min, threads_min = SMALLEST
            rest = _shared_bytes(0, 0, 0, dim, kc_min, 8 * (threads_min // (kc_min // 8)), 1, ph * pw)
            hint = "choose a smaller kc" if image + rest <= shared_limit \
                else f"its {c}x{hpad}x{wpad} input image alone takes {image} bytes: run this model with torch, " \
                     f"ONNX Runtime or TensorRT"
            raise EdgehebbError(f"a {block.kernel}x{block.kernel}x{c} block with kc={kc} does not fit the device's "
                                f"{shared_limit} bytes of shared memory; {hint}")
        nch = fits[0]
    if not 1 <= nch <= dim:
        raise EdgehebbError(f"nch must be in [1, {dim}], got {nch}")
    if size(nch) > shared_limit:
        raise EdgehebbError(f"the plan needs {size(nch)} bytes of shared memory, the device allows {shared_limit}")
    chunks = math.ceil(K / kc)
    defines = dict(CH=c, KW=block.kernel, STRIDE=block.stride, PAD=block.padding, HIN=h, WIN=w, HO=mh, WO=mw,
                   POOL=block.pool, PSTRIDE=block.pool_stride, HP=ph, WP=pw, CENTER=int(block.center),
                   KC=kc, NTHREADS=threads, NCH=nch, KPAD=chunks * kc)
    return FusedPlan(defines=tuple(defines.items()), chunks=chunks, threads=threads, shared_bytes=size(nch))


def kernel_filters(layer: NNLConv, padded: int) -> torch.Tensor:
    """(N, padded) float32: the layer's unit filters, centred when it centres, transposed, zero beyond K.

    The same float32 steps as ``NNLConv.cosines`` and the op's function body: unit length, then the
    filter's mean subtracted.
    """
    m = layer.unit_weight().detach().float()
    if layer.center:
        m = m - m.mean(dim=(1, 2, 3), keepdim=True)
    flat = m.flatten(1)                                  # (K, N), n = (channel, row, column)
    out = torch.zeros(flat.shape[1], padded, dtype=torch.float32, device=flat.device)
    out[:, : flat.shape[0]] = flat.T
    return out.contiguous()


@dataclass(frozen=True)
class BlockLaunch:
    """What one block's kernel launch needs: its plan, filters as the kernel reads them, output columns."""

    block: BlockSpec
    plan: FusedPlan
    filters: torch.Tensor   # (N, KPAD) float32, on the network's device
    offset: int             # first feature column of the block
    width: int              # K * HP * WP columns
    whiten: NNLConv | None = None   # a whitened block's layer: its patches are whitened in torch first

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernel reads: the (colour-normalised) images, or for a whitened block its whitened
        patches (B, N, H', W') as a contiguous image of N channels, which the plan runs 1 x 1, stride 1."""
        return x if self.whiten is None else self.whiten.whitened(x).contiguous()


def _check_blocks(net: Net) -> None:
    if not len(net.blocks) or not all(isinstance(b, NNLConv) for b in net.blocks):
        raise EdgehebbError("the fused kernel runs NNL-CONV blocks; this network has standard convolutions "
                            "(a CONV twin): run it with torch")


def block_launches(net: Net, shared_limit: int, *, kc: int | None = None, threads: int | None = None,
                   nch: int | None = None) -> list[BlockLaunch]:
    """One :class:`BlockLaunch` per block of ``net`` (no pycuda needed: the host emulation uses it too)."""
    _check_blocks(net)
    spec, out, offset = net.spec, [], 0
    for block, layer in zip(spec.blocks, net.blocks):
        # the layer's own settings: a ConvNet with patch_norm gives every block its power, not the spec's
        block = dataclasses.replace(block, power=layer.power, stride=layer.stride, padding=layer.padding,
                                    pool=layer.pool, pool_stride=layer.pool_stride, center=layer.center,
                                    sigma=layer.sigma)
        shape, whiten = spec.input, None
        if layer.whitening is not None:
            # the whitening convolution runs in torch (BlockLaunch.input); the kernel then sees an image of
            # the N whitened values per position and the block's filters as 1 x 1 over it
            shape, whiten = (layer.whitening.shape[0], *block.map_size(*spec.input[1:])), layer
            block = dataclasses.replace(block, kernel=1, stride=1, padding=0)
        plan = fused_plan(block, shape, shared_limit=shared_limit, kc=kc, threads=threads, nch=nch)
        width = block.filters * math.prod(block.out_size(*shape[1:]))
        out.append(BlockLaunch(block, plan, kernel_filters(layer, plan.define("KPAD")), offset, width, whiten))
        offset += width
    return out


class FusedNet:
    """A network whose blocks run through the fused kernel on one GPU; the head runs in torch.

    ``net`` (an ``NNLNet``, or a ``ConvNet`` with ``patch_norm``) must sit on a CUDA device and have
    only patch-normalised blocks. ``kc``/``threads``/``nch`` override every block's plan (tests,
    benchmarks). Calls hold no state between them (each allocates its output from torch's caching
    allocator), so threads may share an instance.
    """

    def __init__(self, net: Net, *, kc: int | None = None, threads: int | None = None, nch: int | None = None):
        _check_blocks(net)
        cuda = driver(why="the fused NNL kernel is launched with pycuda")
        device = net.feature_mean.device
        if device.type != "cuda":
            raise EdgehebbError(f"move the network to a CUDA device first (it is on {device})")
        self.net, self.device = net, device
        self._ordinal = device.index if device.index is not None else torch.cuda.current_device()
        self._ctx = context(self._ordinal, FALLBACK)
        with Active(self._ctx):
            dev = self._ctx.get_device()
            limit = dev.get_attribute(cuda.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            self.device_name = dev.name()
            self._launches = block_launches(net, limit, kc=kc, threads=threads, nch=nch)
            self._functions = []
            for launch in self._launches:
                fn = compiled_module(self._ordinal, cuda_source(KERNEL_FILE), launch.plan.options, FALLBACK) \
                    .get_function("nnl_forward")
                fn.prepare("PPPiifff")
                fn.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, launch.plan.shared_bytes)
                self._functions.append(fn)
        self.feature_dim = sum(launch.width for launch in self._launches)
        self.eps = layer_eps(net)

    @property
    def plans(self) -> list[FusedPlan]:
        return [launch.plan for launch in self._launches]

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        want = self.net.spec.input
        if not isinstance(x, torch.Tensor) or x.device != self.device or x.dtype != torch.float32 \
                or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise EdgehebbError(f"the fused kernel takes float32 (B, {', '.join(map(str, want))}) images on "
                                f"{self.device}, got {got}")
        return x.contiguous()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) pooled block outputs, unstandardised (as ``net.features``)."""
        x = colour_normalise(self._check(x), self.net.spec.colour_norm)   # torch: a few ops per image
        batch = x.shape[0]
        out = torch.empty(batch, self.feature_dim, dtype=torch.float32, device=self.device)
        if batch == 0:
            return out
        stream = torch.cuda.current_stream(self.device)
        foreign = stream != torch.cuda.default_stream(self.device)
        if foreign:
            stream.synchronize()  # our launches go to the legacy default stream
        with Active(self._ctx):
            images = []   # kept until the end: the caching allocator must not hand them out while a launch reads
            for fn, launch in zip(self._functions, self._launches):
                image = launch.input(x)   # a whitened block's convolution runs in torch, on torch's stream
                images.append(image)
                if foreign and image is not x:
                    stream.synchronize()
                fn.prepared_call((batch, launch.plan.chunks, 1), (launch.plan.threads, 1, 1),
                                 np.intp(image.data_ptr()), np.intp(launch.filters.data_ptr()),
                                 np.intp(out.data_ptr() + 4 * launch.offset), np.int32(launch.block.filters),
                                 np.int32(self.feature_dim), np.float32(launch.block.power), np.float32(self.eps),
                                 np.float32(launch.block.sigma ** 2), shared_size=launch.plan.shared_bytes)
        if foreign:
            torch.cuda.synchronize(self.device)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes)."""
        return self.net.classify(self.features(x))


def layer_eps(net: Net) -> float:
    """The patch-norm epsilon of the network's blocks (one value: ``nnl.EPS`` unless changed)."""
    values = {float(b.eps) for b in net.blocks}
    if len(values) != 1:
        raise EdgehebbError(f"the blocks use different eps values {sorted(values)}; the fused path takes one")
    return values.pop()
