"""Camera conditions: what real cameras do to images, as seeded, deterministic uint8 -> uint8 functions.

Each condition in :data:`CONDITIONS` maps uint8 NHWC images, a severity and a seed to new uint8
images of the same shape (:func:`apply_condition`). Severity is in the condition's own physical unit
(stops of light, mireds, JPEG quality lost, ...), 0 is the clean image (returned unchanged) and
larger is worse; each condition has a default sweep from 0 up to where cameras stop being usable.

Light model shared by every condition except ``jpeg`` and ``shadow``: an encoded pixel ``p`` in
0..255 holds linear light ``L = (p / 255) ** 2.2`` (a display gamma of 2.2: the sRGB curve without
its short linear toe). Gains, noise and falloff act on ``L``, where the sensor collects light; the
result is clipped to [0, 1], encoded with the inverse power and rounded half up to uint8, as
:mod:`edgehebb.camera.shadow` rounds. Because the curve is a pure power, a gain ``g`` on ``L`` is a gain
``g ** (1 / 2.2)`` on ``p`` wherever nothing clips. Colour gains use the linear sRGB primaries and
keep the luminance of a grey (Rec. 709 weights 0.2126, 0.7152, 0.0722) unchanged.

Randomness (sensor noise, lighting directions, shadow shapes) comes from one generator per image,
seeded with ``(seed, condition tag, start + i)`` (``start``: index of the batch's first image), so
an image gets the same draw whatever batch it comes in. The shadow condition is the paper's
(:mod:`edgehebb.camera.shadow`) with its own seeding, so ``shadow`` at severity 0.7 and seed s is exactly
``edgehebb eval``'s shadowed set at ``--shadow-seed s``. JPEG goes through PIL's libjpeg, which is
deterministic on one build; other builds (SIMD paths) may differ in the last bit of a few pixels.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from edgehebb.errors import EdgehebbError
from edgehebb.camera.shadow import COVERAGE, darken, shadow_masks

GAMMA = 2.2                                     # display transfer: L = (p / 255) ** GAMMA
LUMA = np.array([0.2126, 0.7152, 0.0722])       # luminance of linear sRGB R, G, B
FULL_WELL = 10_000                              # photo-electrons a white pixel collects at clean exposure
READ_NOISE = 3.0                                # electrons rms added by the readout, whatever the light
REFERENCE_KELVIN = 6504.0                       # the colour temperature the camera's white balance assumes
_CHUNK = 1024                                   # images per vectorised step: bounds the float temporaries

_LINEAR = (np.arange(256) / 255.0) ** GAMMA     # encoded level -> linear light


@dataclass(frozen=True)
class Condition:
    """One camera condition: its model (the function's docstring), unit, default sweep and valid range."""

    name: str
    unit: str                                  # what a severity measures (the x-axis label)
    sweep: tuple[float, ...]                   # default severities, 0 (clean) first
    most: float                                # largest valid severity (the smallest is 0)
    level: Callable[[float], dict]             # physical parameters at a severity, for the JSON
    params: dict                               # constants of the model
    fn: Callable = field(repr=False)           # (uint8 chunk, severity, seed, start) -> uint8 chunk
    integer: bool = False                      # severities must be whole numbers (JPEG quality)
    colour: bool = False                       # needs 3 channels (R, G, B)

    @property
    def model(self) -> str:
        """The physical model in one paragraph (the first of the function's docstring)."""
        return " ".join((self.fn.__doc__ or "").strip().split("\n\n")[0].split())

    def describe(self) -> dict:
        return {"unit": self.unit, "model": self.model, "params": dict(self.params), "max_severity": self.most}


CONDITIONS: dict[str, Condition] = {}


def _register(name: str, unit: str, sweep: Sequence[float], most: float, level: Callable[[float], dict],
              params: dict | None = None, **flags):
    def add(fn):
        CONDITIONS[name] = Condition(name, unit, tuple(float(s) for s in sweep), float(most), level, params or {},
                                     fn, **flags)
        return fn
    return add


# ----------------------------------------------------------------------------- shared pieces

def _encode(linear: np.ndarray) -> np.ndarray:
    """Linear light -> uint8: clip to [0, 1], inverse gamma, round half up."""
    return np.floor(255.0 * np.clip(linear, 0.0, 1.0) ** (1.0 / GAMMA) + 0.5).astype(np.uint8)


def _channel_gains(images: np.ndarray, gains: Sequence[float]) -> np.ndarray:
    """Linear-light gain per channel, through one 256-entry look-up table per channel (exact, fast)."""
    lut = np.stack([_encode(_LINEAR * g) for g in gains])        # (C, 256)
    return lut[np.arange(len(gains)), images]                    # broadcasts over the last axis


def _scale(images: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Pixels lit by ``light`` (N, H, W) times the scene's light: a gain on L, encoded (see the module doc)."""
    p = images.astype(np.float32) * (light.astype(np.float32) ** np.float32(1.0 / GAMMA))[..., None]
    return np.floor(np.minimum(p, 255.0) + 0.5).astype(np.uint8)


def _luma_neutral(gains: np.ndarray) -> np.ndarray:
    """Gains scaled so that a grey keeps its luminance (white balance errors change hue, not brightness)."""
    return gains / float(LUMA @ gains)


def _rngs(name: str, seed: int, start: int, n: int) -> list[np.random.Generator]:
    tag = zlib.crc32(name.encode())   # each condition draws its own numbers, stable across Python runs
    return [np.random.default_rng([seed, tag, start + i]) for i in range(n)]


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the frame centre, in pixels."""
    y, x = np.mgrid[0:h, 0:w]
    return y + 0.5 - h / 2, x + 0.5 - w / 2


# ----------------------------------------------------------------------------- sensor noise

@_register("low-light", "stops less light", (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 16,
           lambda s: {"light": 2.0 ** -s, "gain": 2.0 ** s, "electrons_at_white": FULL_WELL * 2.0 ** -s},
           {"full_well_electrons": FULL_WELL, "read_noise_electrons": READ_NOISE, "transfer_gamma": GAMMA})
def _low_light(images, s, seed, start):
    """The scene gets 2^-s of the light and the camera's auto-gain multiplies by 2^s to restore the
    brightness: a pixel of linear light L collects Poisson(L * 10,000 * 2^-s) photo-electrons (10,000
    at white at clean exposure, a small phone-camera pixel), the readout adds Gaussian noise of 3
    electrons rms, the gain 2^s / 10,000 maps electrons back to L, which is clipped, encoded and
    quantised. Each channel of each pixel is an independent photosite (no demosaicing, no denoiser).

    The clean image is taken as noise-free, so severity 0 returns it unchanged.
    """
    electrons = _LINEAR[images] * (FULL_WELL * 2.0 ** -s)
    out = np.empty(images.shape, np.float64)
    for i, rng in enumerate(_rngs("low-light", seed, start, len(images))):
        out[i] = rng.poisson(electrons[i]) + rng.normal(0.0, READ_NOISE, electrons[i].shape)
    return _encode(out * (2.0 ** s / FULL_WELL))


# ----------------------------------------------------------------------------- white balance

def planckian_rgb(kelvin: float) -> np.ndarray:
    """Linear sRGB of a black body at ``kelvin`` (1667-25000 K), at luminance 1.

    Its chromaticity is Kim et al.'s cubic-spline fit of the Planckian locus (2002; |error| < 3e-4 in
    xy against Planck's law with the CIE 1931 observer), turned into sRGB with the standard matrix.
    """
    t = float(kelvin)
    if not 1667.0 <= t <= 25000.0:
        raise EdgehebbError(f"colour temperature {t:.0f} K is outside the fitted range 1667-25000 K")
    if t <= 4000:
        x = -0.2661239e9 / t ** 3 - 0.2343589e6 / t ** 2 + 0.8776956e3 / t + 0.179910
    else:
        x = -3.0258469e9 / t ** 3 + 2.1070379e6 / t ** 2 + 0.2226347e3 / t + 0.240390
    if t <= 2222:
        y = -1.1063814 * x ** 3 - 1.34811020 * x ** 2 + 2.18555832 * x - 0.20219683
    elif t <= 4000:
        y = -0.9549476 * x ** 3 - 1.37418593 * x ** 2 + 2.09137015 * x - 0.16748867
    else:
        y = 3.0817580 * x ** 3 - 5.87338670 * x ** 2 + 3.75112997 * x - 0.37001483
    xyz = np.array([x / y, 1.0, (1.0 - x - y) / y])
    to_srgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    return to_srgb @ xyz


def cast_gains(mireds: float) -> tuple[float, np.ndarray]:
    """(kelvin, linear R, G, B gains) of light ``mireds`` warmer (> 0) or cooler (< 0) than the camera's
    white balance assumes, luminance-neutral (see :func:`_luma_neutral`)."""
    kelvin = 1e6 / (1e6 / REFERENCE_KELVIN + mireds)
    return kelvin, _luma_neutral(planckian_rgb(kelvin) / planckian_rgb(REFERENCE_KELVIN))


def _cast_level(sign: int) -> Callable[[float], dict]:
    def level(s: float) -> dict:
        kelvin, gains = cast_gains(sign * s)
        return {"kelvin": round(kelvin, 1), "gains": [round(float(g), 4) for g in gains]}
    return level


_CAST = {"reference_kelvin": REFERENCE_KELVIN, "locus": "Planckian (Kim et al. 2002)", "transfer_gamma": GAMMA}


@_register("wb-warm", "mireds warmer than the white balance", (0, 50, 100, 150, 200, 250, 300), 400,
           _cast_level(+1), _CAST, colour=True)
def _wb_warm(images, s, seed, start):
    """Light warmer than the white balance assumes (a camera set for 6504 K daylight under tungsten or
    candle light): the colour temperature is 10^6 / (10^6 / 6504 + s) K, and each linear channel is
    multiplied by the ratio of that black body's sRGB to the reference's, scaled so that a grey keeps
    its luminance. 200 mireds is 2816 K (tungsten); severities run along the Planckian locus.
    """
    return _channel_gains(images, cast_gains(s)[1])


@_register("wb-cool", "mireds cooler than the white balance", (0, 25, 50, 75, 100), 110,
           _cast_level(-1), _CAST, colour=True)
def _wb_cool(images, s, seed, start):
    """Light cooler than the white balance assumes (a camera set for 6504 K in open shade or under a
    blue sky): colour temperature 10^6 / (10^6 / 6504 - s) K, channel gains as for wb-warm. 75 mireds is
    12,700 K; 110 is about 23,000 K, near the end of the fitted locus.
    """
    return _channel_gains(images, cast_gains(-s)[1])


def tint_gains(stops: float) -> np.ndarray:
    """Linear R, G, B gains of a green (> 0) or magenta (< 0) tint of ``stops``, luminance-neutral."""
    return _luma_neutral(np.array([1.0, 2.0 ** stops, 1.0]))


def _tint_level(sign: int) -> Callable[[float], dict]:
    return lambda s: {"gains": [round(float(g), 4) for g in tint_gains(sign * s)]}


@_register("tint-green", "stops of green over red and blue", (0, 0.25, 0.5, 0.75, 1.0), 3,
           _tint_level(+1), {"transfer_gamma": GAMMA}, colour=True)
def _tint_green(images, s, seed, start):
    """A green tint, off the Planckian locus (fluorescent or LED light with a green spike, or a white
    balance fooled by foliage): green gains 2^s over red and blue in linear light, then all three are
    scaled so that a grey keeps its luminance.
    """
    return _channel_gains(images, tint_gains(s))


@_register("tint-magenta", "stops of red and blue over green", (0, 0.25, 0.5, 0.75, 1.0), 3,
           _tint_level(-1), {"transfer_gamma": GAMMA}, colour=True)
def _tint_magenta(images, s, seed, start):
    """A magenta tint, the opposite of tint-green (a white balance that over-corrects green light):
    red and blue gain 2^s over green in linear light, luminance-neutral.
    """
    return _channel_gains(images, tint_gains(-s))


# ----------------------------------------------------------------------------- exposure and tone

@_register("overexposure", "stops too much exposure", (0, 0.5, 1, 2, 3), 8,
           lambda s: {"gain": 2.0 ** s}, {"transfer_gamma": GAMMA})
def _overexposure(images, s, seed, start):
    """Exposure 2^s too long (or too much gain): linear light times 2^s, highlights clip at white."""
    return _channel_gains(images, [2.0 ** s] * images.shape[-1])


@_register("underexposure", "stops too little exposure", (0, 2, 4, 6, 8), 12,
           lambda s: {"gain": 2.0 ** -s}, {"transfer_gamma": GAMMA})
def _underexposure(images, s, seed, start):
    """Exposure 2^-s too short with no gain to restore it: linear light times 2^-s, quantised to 8 bits,
    so the image is darker and has fewer levels (white lands at 255 * 2^(-s / 2.2)). No sensor noise:
    that is low-light.
    """
    return _channel_gains(images, [2.0 ** -s] * images.shape[-1])


def _gamma(images: np.ndarray, g: float) -> np.ndarray:
    lut = np.floor(255.0 * (np.arange(256) / 255.0) ** g + 0.5).astype(np.uint8)
    return lut[images]


@_register("gamma-high", "gamma - 1", (0, 0.5, 1, 1.5, 2), 4, lambda s: {"gamma": 1.0 + s})
def _gamma_high(images, s, seed, start):
    """A tone curve with exponent 1 + s on the encoded values (a camera or decoder that applies a
    different gamma than the data was made with): 255 * (p / 255)^(1 + s), so mid-tones darken and
    0 and 255 stay where they are.
    """
    return _gamma(images, 1.0 + s)


@_register("gamma-low", "1 / gamma - 1", (0, 0.5, 1, 1.5, 2), 4, lambda s: {"gamma": 1.0 / (1.0 + s)})
def _gamma_low(images, s, seed, start):
    """The opposite tone curve, exponent 1 / (1 + s): mid-tones brighten and shadows lift; 0 and 255
    stay where they are.
    """
    return _gamma(images, 1.0 / (1.0 + s))


# ----------------------------------------------------------------------------- lighting across the frame

@_register("gradient", "stops of light across the frame", (0, 1, 2, 3, 4, 6), 10,
           lambda s: {"light_ratio": 2.0 ** s}, {"transfer_gamma": GAMMA})
def _gradient(images, s, seed, start):
    """Light that falls off smoothly across the frame (a window or lamp to one side): the linear light
    is multiplied by 2^(s * t), t running linearly from -1/2 to +1/2 between the frame's two extreme
    corners along a direction drawn per image, so the two ends differ by s stops and the geometric
    mean light is unchanged. The bright side clips at white.
    """
    n, h, w, _ = images.shape
    angle = np.array([rng.uniform(0, 2 * np.pi) for rng in _rngs("gradient", seed, start, n)])[:, None, None]
    dy, dx = _grid(h, w)
    along = np.cos(angle) * dx + np.sin(angle) * dy                               # (n, H, W)
    reach = 2 * (np.abs(np.cos(angle)) * w / 2 + np.abs(np.sin(angle)) * h / 2)  # corner to corner
    return _scale(images, 2.0 ** (s * along / reach))


@_register("vignette", "stops darker at the frame corners", (0, 1, 2, 3, 4), 8,
           lambda s: {"corner_light": 2.0 ** -s}, {"falloff": "cos^4 of the field angle", "transfer_gamma": GAMMA})
def _vignette(images, s, seed, start):
    """Natural lens vignetting, uncorrected: light falls as cos^4 of the field angle, 1 / (1 + k r^2)^2
    with r the distance from the centre over the half-diagonal, and k = 2^(s/2) - 1 chosen so that the
    frame's corners get 2^-s of the centre's light. The same for every image (no randomness).
    """
    _, h, w, _ = images.shape
    dy, dx = _grid(h, w)
    r2 = (dy ** 2 + dx ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
    light = 1.0 / (1.0 + (2.0 ** (s / 2) - 1.0) * r2) ** 2
    return _scale(images, np.broadcast_to(light, images.shape[:3]))


# ----------------------------------------------------------------------------- compression and shadows

@_register("jpeg", "JPEG quality lost (100 - quality)", (0, 10, 25, 50, 70, 80, 90, 95), 99,
           lambda s: {"quality": int(100 - s)}, {"encoder": "PIL libjpeg, 4:2:0 chroma subsampling"},
           integer=True)
def _jpeg(images, s, seed, start):
    """Recompression as a camera or a video link does it: each image is encoded as a baseline JPEG at
    quality 100 - s (libjpeg's standard tables, scaled; PIL's default 4:2:0 chroma subsampling) and
    decoded again. Errors come from the quantised DCT coefficients and the halved chroma resolution.
    """
    from PIL import Image

    out = np.empty_like(images)
    mode = {1: "L", 3: "RGB"}.get(images.shape[-1])
    if mode is None:
        raise EdgehebbError(f"jpeg needs 1 or 3 channels, got {images.shape[-1]}")
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if mode == "L" else img).save(buf, format="JPEG", quality=int(100 - s))
        out[i] = np.asarray(Image.open(buf).convert(mode)).reshape(img.shape)
    return out


@_register("shadow", "1 - shadow intensity", (0, 0.3, 0.5, 0.7, 0.8, 0.9), 1,
           lambda s: {"intensity": round(1.0 - s, 6), "coverage": COVERAGE}, {"coverage": COVERAGE})
def _shadow(images, s, seed, start):
    """The paper's shadows (edgehebb.camera.shadow): 80 % of each image, in a seeded irregular region with a
    sharp edge, multiplied by 1 - s on the encoded values. Severity 0.7 is the paper's 0.3 shadow.
    """
    n, h, w, _ = images.shape
    return darken(images, shadow_masks(n, h, w, COVERAGE, seed, start).astype(bool), 1.0 - s)


# ----------------------------------------------------------------------------- public entry points

def get(name: str) -> Condition:
    if name not in CONDITIONS:
        raise EdgehebbError(f"unknown camera condition {name!r}; expected one of: {', '.join(CONDITIONS)}")
    return CONDITIONS[name]


def check_severity(name: str, severity) -> float:
    """``severity`` as a float, if it is valid for condition ``name``; else one-line EdgehebbError."""
    cond = get(name)
    try:
        s = float(severity)
    except (TypeError, ValueError):
        s = float("nan")
    if not 0.0 <= s <= cond.most or (cond.integer and s != int(s)):   # also rejects NaN
        kind = "a whole number" if cond.integer else "a number"
        raise EdgehebbError(f"{name} severity must be {kind} in [0, {cond.most:g}] ({cond.unit}), got {severity!r}")
    return s


def select(names: str | Sequence[str] | None) -> list[str]:
    """Condition names from ``"all"`` (or None), a comma-separated string or a list; unknown names raise."""
    if names is None or names == "all":
        return list(CONDITIONS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise EdgehebbError(f"no camera condition given; expected all or names from: {', '.join(CONDITIONS)}")
    for n in names:
        get(n)
    return list(dict.fromkeys(names))


def sweep(name: str, severities: Sequence[float] | None = None) -> tuple[float, ...]:
    """The severities to evaluate ``name`` at: ``severities`` (checked) or the default, sorted, 0 included."""
    given = get(name).sweep if severities is None else severities
    return tuple(sorted({0.0, *(check_severity(name, s) for s in given)}))


def parse_sweep(text: str) -> tuple[str, tuple[float, ...]]:
    """``"NAME=S1,S2,..."`` (the CLI's --severities) -> (name, checked severities)."""
    name, eq, values = text.partition("=")
    name = name.strip()
    if not eq or not values.strip():
        raise EdgehebbError(f"expected NAME=S1,S2,... (e.g. low-light=0,2,4), got {text!r}")
    get(name)
    parts = [v.strip() for v in values.split(",") if v.strip()]
    return name, sweep(name, parts)


def plan(names: str | Sequence[str] | None = None,
         sweeps: dict[str, Sequence[float]] | None = None) -> dict[str, tuple[float, ...]]:
    """{condition: severities} to evaluate: :func:`select` of ``names``, each with its default sweep or
    the one ``sweeps`` gives (which may only name selected conditions); everything checked."""
    chosen = select(names)
    extra = sorted(set(sweeps or {}) - set(chosen))
    if extra:
        raise EdgehebbError(f"severities given for {', '.join(extra)}, which is not among the conditions "
                            f"evaluated ({', '.join(chosen)})")
    return {n: sweep(n, (sweeps or {}).get(n)) for n in chosen}


def apply_condition(images: np.ndarray, name: str, severity: float, seed: int = 0, start: int = 0) -> np.ndarray:
    """uint8 NHWC ``images`` under condition ``name`` at ``severity`` (0: an unchanged copy); see the module doc.

    ``start`` is the index of the first image in its data set: the per-image draws depend on it, not on
    how the set is split into batches.
    """
    cond = get(name)
    s = check_severity(name, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EdgehebbError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if cond.colour and images.shape[-1] != 3:
        raise EdgehebbError(f"{name} needs RGB images (3 channels), got {images.shape[-1]}")
    if s == 0.0:
        return np.array(images)
    out = np.empty_like(images)
    for lo in range(0, len(images), _CHUNK):
        out[lo:lo + _CHUNK] = cond.fn(np.asarray(images[lo:lo + _CHUNK]), s, seed, start + lo)
    return out


def halving_severity(severities: Sequence[float], accuracies: Sequence[float], clean: float) -> float | None:
    """The severity at which accuracy first falls to half of ``clean``, interpolated linearly between
    the two levels around the crossing; None if it never does within the sweep (or ``clean`` is 0)."""
    half = clean / 2
    if clean <= 0:
        return None
    for i, (s, a) in enumerate(zip(severities, accuracies)):
        if a <= half:
            if i == 0:
                return float(s)
            s0, a0 = severities[i - 1], accuracies[i - 1]
            return float(s0 + (a0 - half) / (a0 - a) * (s - s0))
    return None
