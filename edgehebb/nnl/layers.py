"""NNL-CONV networks (Grinberg, Hopfield & Krotov 2019) and their standard-CONV twins.

One NNL-CONV block, for every W x W x C patch v of the image (a filter bank M with rows M_mu)::

    x   <- colour_norm(x)                      (net-level, off by default; see colour_normalise)
    v   <- v - mean(v)                         (only with center=True; the default, False, is the paper's plain norm)
    u    = v / (sqrt(|v|^2 + sigma^2) + eps)   patch normalisation (eps: see EPS below; sigma: a block's
                                               semi-saturation constant, 0 by default: u = v / (|v| + eps))
    c_mu = <M_mu / |M_mu|, u>                  a cosine in [-1, 1]
    h_mu = max over a pool window of f(c_mu),  f(x) = ReLU(x)^n  (x clipped at 1 against rounding)

ReLU(x)^n is monotonic, so max-pooling the cosines first and raising only the pooled values to n
gives the same numbers for a fraction of the work; both orders are kept (``pool_first``) so the
tests can show it. A network runs several blocks side by side on the input image, flattens and
concatenates their pooled maps, and a linear layer (softmax classifier) maps them to logits.

The plain norm cuts no patch out of the image: <m, v> is one ordinary convolution and |v|^2 a
convolution of the squared image with a ones kernel. Centred blocks do cut them (``unfold``), to
centre each patch before its sums: the same in exact arithmetic as a convolution with centred
filters and s_2 - s_1^2 / N, but accurate in float32 (see ``_centred_ieee``).

Filters are (K, C, W, W) ``conv2d`` weights, as :mod:`edgehebb.learn.patches` lays out a patch; images
are float NCHW in [0, 1]. Architectures are :class:`NetSpec` objects (:mod:`edgehebb.nnl.spec`), read
from JSON in ``models/``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgehebb.errors import EdgehebbError
from edgehebb.nnl.spec import COLOUR_NORMS, BlockSpec, NetSpec, check_sigma, feature_dim

# Added to the patch norm before dividing, u = v / (|v| + EPS). It keeps a flat patch (|v| = 0: black,
# or with centring any uniform region) at cosine ~0 instead of 0/0 or rounding noise: in float32
# the centred dot product of a flat patch is not exactly 0 but up to ~2e-7 (measured on CIFAR-10),
# so EPS = 1e-6 would let flat patches report cosines up to ~0.2, while 1e-4 keeps them below 2e-3.
# It is still small beside a patch that differs from flat by one grey level
# (|v| >= (1/255) * sqrt(1 - 1/N) ~ 3.9e-3: at most 2.5% attenuation there, ~0.1% for typical patches).
EPS = 1e-4

# gray-world divides each channel by its image mean (then multiplies by the mean grey); a channel darker on average than this (a fraction of
# one grey level, 1/255) is divided by it instead, so an (almost) empty channel is not blown up to noise
COLOUR_EPS = 1e-3


# ----------------------------------------------------------------------------- layers

@contextlib.contextmanager
def _ieee_fp32(x: torch.Tensor):
    """No TF32 in cuDNN convolutions while inside. TF32 rounds the dot product's inputs to 10 bits
    (~1e-3 relative in a cosine), which x^40 turns into ~4%: on an H100 it moved fig2_left logits by
    up to 35x a row's max and flipped 0.9% of top-1 decisions against the CPU."""
    if not x.is_cuda:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.compiler.disable
def _conv_ieee(x: torch.Tensor, m: torch.Tensor, stride: int) -> torch.Tensor:
    """The block's convolution in IEEE FP32. Kept out of torch.compile: dynamo traces through the
    flag switch of :func:`_ieee_fp32` without keeping it, and the compiled convolution would then
    run with the global TF32 default.

    On the CPU the image goes in channels-last, and so the cosine map comes out channels-last, (B, H, W,
    K) in memory: oneDNN's direct convolution for that layout took 0.21 ms for one 32 x 32 image and 400
    filters of 4 x 4 x 3 against 1.3 ms in NCHW, and a max-pool then runs along contiguous channels
    (0.07 ms against 0.74 ms for fig2_left's 11 / 6 pool; one thread, 2-core CPU, BENCHMARKS.md). The
    numbers are the NCHW ones bit for bit (tests/test_nnl.py), and downstream ops keep the layout."""
    if not x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with _ieee_fp32(x):
        return F.conv2d(x, m, stride=stride)


@torch.compiler.disable
def _centred_ieee(x: torch.Tensor, m: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(<m, v - mean(v)>, |v - mean(v)|^2) for every patch v of ``x``, (B, K, L) and (B, 1, L), on the
    patches themselves: each centred before the dot product (two passes, as OP_SPEC.md asks), in
    IEEE FP32. A convolution of the image with the centred filters is the same sum in exact
    arithmetic, but in float32 it is taken over values that still carry the patch's mean: on a
    low-contrast patch its rounding is ~1e-5 of the cosine, which x^40 raised to 3.5e-4 of a logit
    row's largest (fig2_left, dimmed images; OP_SPEC allows 1e-4)."""
    with _ieee_fp32(x):
        p = F.unfold(x, m.shape[-1], stride=stride)                       # (B, N, L)
        p = p - p.mean(dim=1, keepdim=True)
        # centred filters too (<m, d> = <m - mean(m), d> when d sums to 0): the rounding of each
        # patch's mean then shifts d along the flat direction, to which they are blind
        mc = m.flatten(1) - m.flatten(1).mean(dim=1, keepdim=True)
        return torch.matmul(mc, p), p.pow(2).sum(dim=1, keepdim=True)


def _unit(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each filter (K, C, W, W) scaled to unit length."""
    return w / w.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None, None]


def _relu_pow(x: torch.Tensor, n: float, upper: float | None = None) -> torch.Tensor:
    """f(x) = ReLU(x)^n; ``upper`` also clips from above (a no-op for exact cosines, see NNLConv)."""
    x = x.clamp(0, upper)
    return x if n == 1 else x.pow(n)


def colour_normalise(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-image colour normalisation of float NCHW images before the blocks (``NetSpec.colour_norm``).

    ``none``: ``x`` itself. ``gray-world``: each channel c of each image is multiplied by
    g_c = mean_c'(mu_c') / max(mu_c, COLOUR_EPS), mu_c the channel's mean over the image's pixels: a
    per-channel gain on the scene (a colour cast, a white-balance error) multiplies mu_c by the same
    gain and so cancels, exactly up to rounding while no pixel clips, but for one factor per image:
    the image's mean grey level mean_c'(mu_c') is kept, and the gains change it (the patch norm is blind
    to that factor; sigma is not, and should see the scene's brightness). Values are not clipped, so a
    channel may exceed 1 (the blocks do not need [0, 1]).
    """
    if mode == "none":
        return x
    if mode != "gray-world":
        raise EdgehebbError(f"unknown colour_norm {mode!r}; expected one of {', '.join(COLOUR_NORMS)}")
    mu = x.mean(dim=(2, 3), keepdim=True)                                   # (B, C, 1, 1)
    return x * (mu.mean(dim=1, keepdim=True) / mu.clamp_min(COLOUR_EPS))


class NNLConv(nn.Module):
    """Patch-normalised cosine convolution, f(x) = ReLU(x)^n, then max-pooling.

    ``filters`` (K, C, W, W) are stored unit-normalised. Frozen by default (a buffer, normalised once
    here: the local-learning setting); ``trainable=True`` makes them a parameter, normalised on every
    forward pass, for the backprop ablations with patch normalisation. ``norm=False`` skips the
    division by the patch norm (the ablation without patch normalisation): f(<unit filter, patch>).
    ``sigma`` > 0 divides by sqrt(|v|^2 + sigma^2) + eps instead of |v| + eps (BlockSpec.sigma).
    """

    def __init__(self, filters: torch.Tensor, power: float, stride: int = 1, padding: int = 0,
                 pool: int = 1, pool_stride: int | None = None, center: bool = False, eps: float = EPS,
                 pool_first: bool = True, trainable: bool = False, norm: bool = True, sigma: float = 0.0,
                 whitening: torch.Tensor | None = None):
        super().__init__()
        if filters.dim() != 4:
            raise EdgehebbError(f"filters must be (K, C, W, W), got shape {tuple(filters.shape)}")
        if not power > 0:
            raise EdgehebbError(f"power must be > 0, got {power}")
        self.power, self.stride, self.padding, self.center, self.eps = float(power), stride, padding, center, eps
        self.pool, self.pool_stride, self.pool_first, self.trainable = pool, pool_stride or pool, pool_first, trainable
        self.norm, self.sigma = norm, check_sigma(sigma)
        if self.sigma and not norm:
            raise EdgehebbError(f"sigma {self.sigma:g} needs the patch norm (norm=True)")
        w = filters.detach().float().clone()
        if trainable:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", _unit(w))
        self.register_buffer("ones", torch.ones(1, *w.shape[1:]), persistent=False)
        self.register_buffer("whitening", None)   # a plain block: no whitening (and none in its state_dict)
        if whitening is not None:
            # a whitened block: the convolution (N, C, W, W) whitens every patch, and the filters are
            # (K, N, 1, 1) over the whitened patch (BlockSpec.whiten)
            n = whitening.shape[0]
            if whitening.dim() != 4 or n != math.prod(whitening.shape[1:]) or tuple(w.shape[1:]) != (n, 1, 1):
                raise EdgehebbError(f"a whitened block needs a whitening of shape (N, C, W, W), N = C*W*W, and filters "
                                    f"(K, N, 1, 1); got {tuple(whitening.shape)} and {tuple(w.shape)}")
            if center or not norm:
                raise EdgehebbError("a whitened block needs the plain patch norm (center=False, norm=True)")
            self.register_buffer("whitening", whitening.detach().float().clone())

    @classmethod
    def from_block(cls, filters: torch.Tensor, block: BlockSpec, *, power: float | None = None,
                   norm: bool | None = None, trainable: bool = False,
                   whitening: torch.Tensor | None = None) -> "NNLConv":
        """The layer of one spec block; ``power`` and ``norm`` replace the block's when given (the backprop
        ablation with patch normalisation always normalises, at its own n); ``whitening``: a whitened
        block's convolution."""
        return cls(filters, block.power if power is None else power, block.stride, block.padding, block.pool,
                   block.pool_stride, block.center, trainable=trainable, norm=block.norm if norm is None else norm,
                   sigma=block.sigma, whitening=whitening)

    def unit_weight(self) -> torch.Tensor:
        return _unit(self.weight) if self.trainable else self.weight

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H', W') cosine between every unit filter and every (centred) unit patch of ``x``.

        With ``norm=False``: the dot product of the unit filter with the (centred) raw patch.
        """
        m = self.unit_weight()
        if self.whitening is not None:
            # the plain norm of each whitened patch's N values and their dot products with the unit filters, 1 x 1
            z = self.whitened(x)
            return self.divide(_conv_ieee(z, m, 1), (z * z).sum(dim=1, keepdim=True))
        if self.padding:
            x = F.pad(x, [self.padding] * 4)
        if self.center:
            # The patches are centred one by one (see _centred_ieee): the one-pass form
            # |v - mean(v)|^2 = s_2 - s_1^2 / N cancels on low-contrast patches, and so does the
            # image-wide dot product with centred filters, less so but enough for x^40.
            h, w = self.map_size(x)
            dot, sq = _centred_ieee(x, m, self.stride)
            dot, sq = dot.view(len(x), -1, h, w), sq.view(len(x), 1, h, w)
        else:
            dot = _conv_ieee(x, m, self.stride)
            # s_2 = |v|^2, no cancellation; in IEEE FP32 too: TF32 would round every squared pixel to
            # ~1e-3, which the n-th power turns into ~4 %
            sq = _conv_ieee(x * x, self.ones, self.stride) if self.norm else None
        if not self.norm:
            return dot
        return self.divide(dot, sq)

    def whitened(self, x: torch.Tensor) -> torch.Tensor:
        """A whitened block's patches of ``x`` (unpadded), whitened and laid out along the channels:
        (B, N, H', W'), the padding and stride applied here (the filters then run 1 x 1, stride 1)."""
        if self.padding:
            x = F.pad(x, [self.padding] * 4)
        return _conv_ieee(x, self.whitening, self.stride)

    def divide(self, dot: torch.Tensor, sq: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The patch norm's division, dot / (sqrt(sq + sigma^2) + eps), sq = |v|^2; ``sigma``: the block's
        unless given (tools/screen_robustness.py derives every sigma from one convolution)."""
        sigma = self.sigma if sigma is None else sigma
        if sigma:   # sigma = 0 skips the addition: the plain norm's numbers, bit for bit
            sq = sq + sigma ** 2
        return dot / (sq.sqrt() + self.eps)

    def map_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of the cosine map of ``x`` (already padded)."""
        k = self.weight.shape[-1]
        return (x.shape[2] - k) // self.stride + 1, (x.shape[3] - k) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A cosine is <= 1; float32 rounding in |v - mean|^2 = s_2 - s_1^2 / N on the lowest-contrast
        # patches can push it ~0.4% above, which x^40 would turn into +17%: clip at 1 (exact no-op).
        c, upper = self.cosines(x), (1.0 if self.norm else None)
        if self.pool_first:  # exact: ReLU(x)^n is monotonic, so it commutes with max
            # contiguous (NCHW) before the power: on a channels-last map torch's pow takes its scalar tail
            # for some elements depending on the batch, which changed their last bit with the chunking
            pooled = F.max_pool2d(c, self.pool, self.pool_stride).contiguous()
            return _relu_pow(pooled, self.power, upper)
        return F.max_pool2d(_relu_pow(c, self.power, upper), self.pool, self.pool_stride)


class ConvBlock(nn.Module):
    """The standard-CONV twin of a block: learnable conv (with bias), ReLU(x)^n, max-pool."""

    def __init__(self, in_channels: int, block: BlockSpec, power: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, block.filters, block.kernel, block.stride, block.padding)
        self.power, self.pool, self.pool_stride = float(power), block.pool, block.pool_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:   # channels-last on the CPU, as NNLConv's convolution (see _conv_ieee): a training
            x = x.contiguous(memory_format=torch.channels_last)   # step of fig2_left's twin 0.71 -> 0.47 s
        pooled = F.max_pool2d(self.conv(x), self.pool, self.pool_stride)
        if not self.training:   # bits independent of the chunking at inference (NNLConv.forward); in
            pooled = pooled.contiguous()   # training the copy's backward cost 80 % more per step
        return _relu_pow(pooled, self.power)


# ----------------------------------------------------------------------------- networks

class HiddenHead(nn.Module):
    """The head with a hidden layer (``head_hidden`` in the spec): ``out(dropout(relu(hidden(z))))``.

    ``dropout`` is a training setting, not part of the model (0 unless :mod:`edgehebb.nnl.train` sets
    it; no effect in eval mode)."""

    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, classes)
        self.dropout = 0.0

    def reset_parameters(self) -> None:
        self.hidden.reset_parameters()
        self.out.reset_parameters()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.dropout(F.relu(self.hidden(z)), self.dropout, self.training))


class Net(nn.Module):
    """Blocks side by side on the image, flattened and concatenated, standardised, then the head: a
    linear layer (softmax classifier), or with ``head_hidden`` a :class:`HiddenHead`.

    With n = 40 the pooled features are tiny (0.85^40 ~ 2e-3, 0.5^40 ~ 1e-12) and spread over
    orders of magnitude, so the head sees them standardised: ``(f - feature_mean) * feature_scale``
    (buffers; 0 and 1, the identity, until :func:`edgehebb.nnl.train` fits them on training features).
    """

    spec: NetSpec
    blocks: nn.ModuleList
    head: nn.Linear | HiddenHead

    def _init_head(self, spec: NetSpec) -> None:
        d = feature_dim(spec)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))
        self.head = (HiddenHead(d, spec.head_hidden, spec.classes) if spec.head_hidden
                     else nn.Linear(d, spec.classes))

    def _check_input(self, x: torch.Tensor) -> None:
        want = self.feature_mean.dtype   # float32, or float64 after .double()
        if x.dim() != 4 or tuple(x.shape[1:]) != self.spec.input or x.dtype != want:
            raise EdgehebbError(f"{self.spec.name} expects {want} images (N, {', '.join(map(str, self.spec.input))}) "
                                f"in [0, 1], got {x.dtype} {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim(spec)) pooled block outputs of float NCHW images in [0, 1] (unstandardised)."""
        self._check_input(x)
        x = colour_normalise(x, self.spec.colour_norm)
        return torch.cat([block(x).flatten(1) for block in self.blocks], dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` output: standardise, then the head."""
        return self.head((features - self.feature_mean) * self.feature_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class NNLNet(Net):
    """NNL-CONV network: one frozen (or, ``trainable_filters``, learnable) NNLConv per spec block."""

    def __init__(self, spec: NetSpec, filter_banks: list, trainable_filters: bool = False):
        """``filter_banks``: one per block, a (K, C, W, W) tensor, or for a whitened block (``whiten`` in
        its spec) a pair (filters (K, N, 1, 1), whitening (N, C, W, W)), N = C*W*W."""
        super().__init__()
        if len(filter_banks) != len(spec.blocks):
            raise EdgehebbError(f"{spec.name} has {len(spec.blocks)} block(s) but "
                                f"{len(filter_banks)} filter bank(s) were given")
        c = spec.input[0]
        layers = []
        for i, (b, bank) in enumerate(zip(spec.blocks, filter_banks)):
            n = c * b.kernel ** 2
            filters, whitening = bank if isinstance(bank, (tuple, list)) else (bank, None)
            want = (b.filters, n, 1, 1) if b.whiten else (b.filters, c, b.kernel, b.kernel)
            if tuple(filters.shape) != want or (b.whiten and (whitening is None or
                                                                tuple(whitening.shape) != (n, c, b.kernel, b.kernel))):
                got = tuple(filters.shape) if whitening is None else (tuple(filters.shape), tuple(whitening.shape))
                what = (f"filters of shape {want} and a whitening of shape {(n, c, b.kernel, b.kernel)}" if b.whiten
                        else f"filters of shape {want}")
                raise EdgehebbError(f"{spec.name} block {i} needs {what}, got {got}")
            layers.append(NNLConv.from_block(filters, b, trainable=trainable_filters,
                                             whitening=whitening if b.whiten else None))
        self.spec = spec
        self.blocks = nn.ModuleList(layers)
        self._init_head(spec)


class ConvNet(Net):
    """The standard CONV twin of a spec, trained end to end: same blocks, pools and head shapes.

    ``power`` replaces every block's n (1 = plain ReLU, the paper's baseline; the ablation uses
    others). ``patch_norm=True`` gives the ablation's backprop network *with* patch normalisation:
    NNLConv blocks whose filters are learnable and start standard normal. Initialisation draws from
    torch's global generator: seed it (``torch.manual_seed``) before building for a repeatable run.
    """

    def __init__(self, spec: NetSpec, power: float = 1.0, patch_norm: bool = False):
        super().__init__()
        c = spec.input[0]
        self.spec, self.power, self.patch_norm = spec, float(power), patch_norm
        if patch_norm:
            self.blocks = nn.ModuleList(
                NNLConv.from_block(torch.randn(b.filters, c, b.kernel, b.kernel), b, power=power, norm=True,
                                   trainable=True)
                for b in spec.blocks)
        else:
            self.blocks = nn.ModuleList(ConvBlock(c, b, power) for b in spec.blocks)
        self._init_head(spec)
