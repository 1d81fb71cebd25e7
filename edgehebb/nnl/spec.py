"""Network architectures as data: :class:`BlockSpec` and :class:`NetSpec`, read from JSON and checked.

A spec is what ``models/*.json`` holds and what a model directory's ``config.json`` records under
``spec``: the blocks' geometry (W, K, n, pooling, stride, padding), the patch norm's options
(``center``, ``norm``, ``sigma``, ``whiten``), the net-level colour normalisation and the head's
hidden layer. Every key, its meaning and its default when absent are listed in
``models/MODEL_FORMAT.md``. Errors name the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgehebb.errors import EdgehebbError
from edgehebb.resources import data_dirs

# Net-level colour normalisations applied to the image before the blocks (NetSpec.colour_norm;
# edgehebb.nnl.colour_normalise).
COLOUR_NORMS = ("none", "gray-world")

# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class BlockSpec:
    kernel: int            # W: patches are W x W x C
    filters: int           # K: filters (units) in the bank
    power: float           # n in ReLU(x)^n
    pool: int              # max-pool window (square)
    pool_stride: int       # max-pool stride
    stride: int = 1        # convolution stride
    padding: int = 0       # zero padding around the image
    center: bool = False   # False: the paper's plain patch norm (filters learned with --preprocess unit);
                           # True: also subtract each patch's mean (filters learned with --preprocess center-unit)
    norm: bool = True      # divide by the patch norm (a cosine); False: the ablation without patch
                           # normalisation, f(<unit filter, patch>) on the raw (centred) patch
    sigma: float = 0.0     # semi-saturation constant (Carandini & Heeger): u = v / (sqrt(|v|^2 + sigma^2) + eps),
                           # so patches with |v| << sigma stay small; 0 is the plain patch norm, bit for bit
    whiten: float = 0.0    # > 0: each patch is whitened (v -> Z v, a learned linear map) before the patch norm,
                           # and the filters live in that space; the value is the regulariser its bank was
                           # learned with (edgehebb learn --whiten); 0: plain patches

    @property
    def preprocess(self) -> str:
        """The ``edgehebb learn --preprocess`` mode whose filters this block expects."""
        return "center-unit" if self.center else "unit"

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the convolution map, before pooling."""
        return ((height + 2 * self.padding - self.kernel) // self.stride + 1,
                (width + 2 * self.padding - self.kernel) // self.stride + 1)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the pooled map."""
        mh, mw = self.map_size(height, width)
        return (mh - self.pool) // self.pool_stride + 1, (mw - self.pool) // self.pool_stride + 1


@dataclass(frozen=True)
class NetSpec:
    name: str
    blocks: tuple[BlockSpec, ...]
    input: tuple[int, int, int] = (3, 32, 32)   # (C, H, W)
    classes: int = 10
    description: str = ""
    colour_norm: str = "none"   # COLOUR_NORMS: a per-image colour normalisation before the blocks
    head_hidden: int = 0        # > 0: the head is Linear(D, H) -> ReLU -> Linear(H, classes) with H units;
                                # 0: one linear layer (softmax classifier), the paper's head

    def to_dict(self) -> dict:
        """JSON-ready form; :func:`spec_from_dict` reads it back."""
        d = asdict(self)
        d["input"], d["blocks"] = list(self.input), [asdict(b) for b in self.blocks]
        # the robustness options are written only when set, so a spec without them reads as before
        for b in d["blocks"]:
            if not b["sigma"]:
                del b["sigma"]
            if not b["whiten"]:
                del b["whiten"]
        if d["colour_norm"] == "none":
            del d["colour_norm"]
        if not d["head_hidden"]:
            del d["head_hidden"]
        return d

    def without_head(self) -> dict:
        """:meth:`to_dict` less what only the head uses: what decides the features (edgehebb.nnl.features)."""
        d = self.to_dict()
        d.pop("head_hidden", None)
        return d


def feature_dim(spec: NetSpec) -> int:
    """Length of the concatenated feature vector: sum over blocks of K * pooled rows * cols."""
    _, h, w = spec.input
    return sum(b.filters * math.prod(b.out_size(h, w)) for b in spec.blocks)


def head_macs(spec: NetSpec) -> int:
    """Multiply-adds of the head per image: D x classes, or D x H + H x classes with a hidden layer of H."""
    d, hidden = feature_dim(spec), spec.head_hidden
    return d * hidden + hidden * spec.classes if hidden else d * spec.classes


def map_floats(spec: NetSpec) -> int:
    """Floats of the cosine maps of one input image before pooling: sum over blocks of K * rows * cols."""
    _, h, w = spec.input
    return sum(b.filters * math.prod(b.map_size(h, w)) for b in spec.blocks)


_BLOCK_KEYS = {f.name for f in fields(BlockSpec)}
_NET_KEYS = {"name", "blocks", "input", "classes", "description", "colour_norm", "head_hidden"}


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EdgehebbError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def check_sigma(value, where: str = "sigma") -> float:
    """``value`` as a float if it is a valid semi-saturation constant (a finite number >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise EdgehebbError(f"{where} must be a number >= 0 (0: the plain patch norm), got {value!r}")
    return float(value)


def check_colour_norm(value, where: str = "colour_norm") -> str:
    if value not in COLOUR_NORMS:
        raise EdgehebbError(f"{where} must be one of {', '.join(COLOUR_NORMS)}, got {value!r}")
    return value


def spec_from_dict(d: dict, source: str = "spec") -> NetSpec:
    """A checked :class:`NetSpec`; errors name ``source`` (the file) and the offending key."""
    if not isinstance(d, dict):
        raise EdgehebbError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if unknown := set(d) - _NET_KEYS:
        raise EdgehebbError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_NET_KEYS)}")
    raw_input = d.get("input", [3, 32, 32])
    if not isinstance(raw_input, (list, tuple)) or len(raw_input) != 3:
        raise EdgehebbError(f"{source}: 'input' must be [C, H, W], got {raw_input!r}")
    c, h, w = (_int(v, f"{source}: input[{i}]", 1) for i, v in enumerate(raw_input))
    classes = _int(d.get("classes", 10), f"{source}: 'classes'", 2)
    raw_blocks = d.get("blocks")
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise EdgehebbError(f"{source}: 'blocks' must be a non-empty list of block objects")
    blocks = []
    for i, b in enumerate(raw_blocks):
        at = f"{source}: blocks[{i}]"
        if not isinstance(b, dict):
            raise EdgehebbError(f"{at} must be an object, got {b!r}")
        if unknown := set(b) - _BLOCK_KEYS:
            raise EdgehebbError(f"{at}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_BLOCK_KEYS)}")
        for key in ("kernel", "filters", "power", "pool"):
            if key not in b:
                raise EdgehebbError(f"{at}: missing key '{key}'")
        power = b["power"]
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise EdgehebbError(f"{at}.power must be a number > 0, got {power!r}")
        center, norm = b.get("center", False), b.get("norm", True)
        for key, flag in (("center", center), ("norm", norm)):
            if not isinstance(flag, bool):
                raise EdgehebbError(f"{at}.{key} must be true or false, got {flag!r}")
        pool = _int(b["pool"], f"{at}.pool", 1)
        sigma = check_sigma(b.get("sigma", 0.0), f"{at}.sigma")
        if sigma and not norm:
            raise EdgehebbError(f"{at}: sigma {sigma:g} needs the patch norm (norm=true); this block has norm=false")
        whiten = b.get("whiten", 0.0)
        if isinstance(whiten, bool) or not isinstance(whiten, (int, float)) or not (math.isfinite(whiten) and whiten >= 0):
            raise EdgehebbError(f"{at}.whiten must be a number >= 0 (0: plain patches), got {whiten!r}")
        if whiten and (center or not norm):
            raise EdgehebbError(f"{at}: whiten needs the plain patch norm (center=false, norm=true)")
        block = BlockSpec(kernel=_int(b["kernel"], f"{at}.kernel", 1),
                          filters=_int(b["filters"], f"{at}.filters", 1),
                          power=float(power), pool=pool,
                          pool_stride=_int(b.get("pool_stride", pool), f"{at}.pool_stride", 1),
                          stride=_int(b.get("stride", 1), f"{at}.stride", 1),
                          padding=_int(b.get("padding", 0), f"{at}.padding", 0), center=center, norm=norm,
                          sigma=sigma, whiten=float(whiten))
        mh, mw = block.map_size(h, w)
        if min(mh, mw) < 1:
            raise EdgehebbError(f"{at}.kernel {block.kernel} does not fit a {h}x{w} input (padding {block.padding})")
        if block.pool > min(mh, mw):
            raise EdgehebbError(f"{at}.pool {block.pool} is larger than the {mh}x{mw} convolution map")
        if not block.norm:
            # without the patch norm a response is a dot product of up to |v| = sqrt(N) (pixels in
            # [0, 1]; half that centred), and its n-th power must stay finite in float32
            top = math.sqrt(c * block.kernel ** 2) * (0.5 if block.center else 1.0)
            if block.power * math.log10(max(top, 1.0)) > 38.0:
                raise EdgehebbError(f"{at}: norm=false with kernel {block.kernel} and power {block.power:g} can reach "
                                    f"{top:.3g}^{block.power:g}, beyond float32 (~3e38): lower the power, or keep norm=true")
        blocks.append(block)
    name = d.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise EdgehebbError(f"{source}: 'name' must be a non-empty string")
    colour_norm = check_colour_norm(d.get("colour_norm", "none"), f"{source}: 'colour_norm'")
    if colour_norm != "none" and c != 3:
        raise EdgehebbError(f"{source}: colour_norm {colour_norm!r} needs 3-channel (RGB) input, got {c} channel(s)")
    head_hidden = _int(d.get("head_hidden", 0), f"{source}: 'head_hidden'", 0)
    return NetSpec(name=name, blocks=tuple(blocks), input=(c, h, w), classes=classes,
                   description=str(d.get("description", "")), colour_norm=colour_norm, head_hidden=head_hidden)


def with_options(spec: NetSpec, sigma: float | None = None, colour_norm: str | None = None,
                 head_hidden: int | None = None) -> NetSpec:
    """``spec`` with every block's ``sigma``, the net's ``colour_norm`` and/or ``head_hidden`` replaced
    (None: kept), checked."""
    d = spec.to_dict()
    if sigma is not None:
        d["blocks"] = [{**b, "sigma": sigma} for b in d["blocks"]]
    if colour_norm is not None:
        d["colour_norm"] = colour_norm
    if head_hidden is not None:
        d["head_hidden"] = head_hidden
    return spec_from_dict(d, spec.name)


def _models_dirs() -> list:
    """Where bare spec names are looked up: package data (a wheel's edgehebb/models), then the source tree."""
    return data_dirs("models")


def available_specs() -> list[str]:
    """Names of the shipped specs (``models/*.json``)."""
    return sorted({p.name[:-5] for d in _models_dirs() for p in d.iterdir() if p.name.endswith(".json")})


def load_spec(name_or_path: str | Path) -> NetSpec:
    """A spec by bare name (``"fig2_left"`` -> ``models/fig2_left.json``) or by path to a JSON file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".json") or "/" in text or "\\" in text:
        if not path.is_file():
            raise EdgehebbError(f"spec file {path} does not exist")
        source, raw = str(path), path.read_text(encoding="utf-8")
    else:
        found = [d.joinpath(f"{text}.json") for d in _models_dirs()]
        found = [f for f in found if f.is_file()]
        if not found:
            raise EdgehebbError(f"unknown model spec {text!r}; shipped specs: {', '.join(available_specs()) or 'none'}"
                                f" (or pass a path to a JSON file)")
        source, raw = f"models/{text}.json", found[0].read_text(encoding="utf-8")
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EdgehebbError(f"{source} is not valid JSON: {e}") from None
    return spec_from_dict(d, source)


