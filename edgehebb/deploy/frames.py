"""Camera frames to network input: the torch twin of the ONNX ``uint8-nhwc`` preprocessing.

An exported model with ``preprocess="uint8-nhwc"`` takes uint8 frames (N, h, w, 3) and does, in
its graph, exactly what :func:`frames_to_tensor` does here, in the same order and with the same
float32 operations, so the torch network on ``frames_to_tensor(frames)`` and the ONNX model on
``frames`` see the same numbers (up to the interpolation kernels' rounding):

1. ``channel_order="bgr"``: reverse the channels (OpenCV / most camera SDKs deliver BGR);
2. uint8 -> float32, divided by 255 (a true division, not a multiply by 1/255: that rounds differently);
3. NHWC -> NCHW;
4. ``fit="center-crop"``: cut the centred region with the model's aspect ratio,
   rows ``min(h, w * H // W)`` and columns ``min(w, h * W // H)`` (integer floor division), offset
   by half the surplus rounded down; ``fit="resize"`` keeps the whole frame (the aspect may change);
5. if the (cropped) size is not (H, W): bilinear resize with half-pixel centres and no antialiasing
   (``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` == ONNX ``Resize``
   ``mode="linear"``, ``coordinate_transformation_mode="half_pixel"``). Downscaling a large frame
   by a big factor this way aliases; that is the contract, kept because TensorRT and ONNX Runtime
   implement it identically.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgehebb.errors import EdgehebbError

CHANNEL_ORDERS = ("rgb", "bgr")
FITS = ("resize", "center-crop")


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise EdgehebbError(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")
    return value


def crop_box(h: int, w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the centred region of an h x w frame with the aspect of ``size``.

    Integer arithmetic only, written so the ONNX graph can compute the same box from dynamic dims.
    """
    th, tw = size
    rows, cols = min(h, w * th // tw), min(w, h * tw // th)
    if rows < 1 or cols < 1:
        raise EdgehebbError(f"a {h}x{w} frame is too small to centre-crop to the model's {th}:{tw} aspect; "
                            f"use fit='resize'")
    return (h - rows) // 2, (w - cols) // 2, rows, cols


def frames_to_tensor(frames, size: tuple[int, int] | None = None, channel_order: str = "rgb",
                     fit: str = "resize", *, device: str | torch.device | None = None) -> torch.Tensor:
    """Float32 NCHW RGB images in [0, 1] of ``size`` (H, W) from uint8 frames (N, h, w, 3) or (h, w, 3).

    ``frames``: a numpy array or torch tensor of dtype uint8. ``size=None`` keeps the frame size.
    ``device``: where to do the work (the uint8 frames move there first: 4x less to copy than floats).
    """
    check_choice(channel_order, CHANNEL_ORDERS, "channel order")
    check_choice(fit, FITS, "fit")
    if isinstance(frames, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        x = frames
    else:
        raise EdgehebbError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if x.dtype != torch.uint8:
        raise EdgehebbError(f"frames must be uint8, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise EdgehebbError(f"frames must be (N, h, w, 3) or (h, w, 3) uint8, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    if channel_order == "bgr":
        x = x.flip(-1)
    x = (x.float() / 255.0).permute(0, 3, 1, 2)
    if size is None:
        return x.contiguous()
    th, tw = (int(v) for v in size)
    if th < 1 or tw < 1:
        raise EdgehebbError(f"size must be two positive integers (H, W), got {size!r}")
    if fit == "center-crop":
        top, left, rows, cols = crop_box(x.shape[2], x.shape[3], (th, tw))
        x = x[:, :, top:top + rows, left:left + cols]
    if tuple(x.shape[2:]) != (th, tw):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous()


def check_frames(frames) -> np.ndarray | torch.Tensor:
    """uint8 (N, H, W, 3) frames (numpy or torch, device kept) from one frame or a batch of one size.

    Float frames in [0, 1] are rounded to uint8 (``round(x * 255)``, the quantisation a camera gives), so
    every backend, baked-in preprocessing included, sees the same input; NaN, infinities and values outside
    [0, 1] (a frame still in 0..255) raise."""
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        raise EdgehebbError(f"frames must be a numpy array, a torch tensor or a list of them, got "
                            f"{type(frames).__name__}")
    shape = tuple(frames.shape)
    if frames.ndim not in (3, 4):
        raise EdgehebbError(f"frames must be one frame (H, W, 3) or a batch (N, H, W, 3), got ndim {frames.ndim} "
                            f"(shape {shape})")
    if shape[-1] != 3:
        hint = " (channels first? transpose to (..., H, W, 3))" if shape[-3] == 3 else ""
        raise EdgehebbError(f"frames must have 3 colour channels in the last axis, got {shape[-1]} "
                            f"(shape {shape}){hint}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[0] == 0:
        raise EdgehebbError(f"empty batch: frames of shape {shape} hold no frame")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise EdgehebbError(f"frames have no pixels (shape {shape})")
    dtype = frames.dtype
    if isinstance(frames, np.ndarray):
        is_uint8, is_float = dtype == np.uint8, dtype.kind == "f"
    else:
        is_uint8, is_float = dtype == torch.uint8, dtype.is_floating_point
    if is_uint8:
        return frames
    if is_float:
        return _quantise(frames, shape)
    raise EdgehebbError(f"frames must be uint8 (0..255) or float in [0, 1], got dtype {dtype}")


def _quantise(frames, shape) -> np.ndarray | torch.Tensor:
    """Float frames in [0, 1] -> uint8, rounded; NaN, inf and out-of-range values raise."""
    if isinstance(frames, np.ndarray):
        finite, lo, hi = bool(np.isfinite(frames).all()), float(frames.min()), float(frames.max())
    else:
        finite, lo, hi = bool(torch.isfinite(frames).all()), float(frames.min()), float(frames.max())
    if not finite:
        raise EdgehebbError(f"float frames of shape {shape} contain NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise EdgehebbError(f"float frames must be in [0, 1], got values in [{lo:g}, {hi:g}] "
                            f"(0..255 floats: divide by 255 or pass uint8)")
    if isinstance(frames, np.ndarray):
        return np.rint(frames.astype(np.float32) * 255).astype(np.uint8)
    return (frames.float() * 255).round_().to(torch.uint8)


def group_frames(frames) -> list[tuple[list[int], np.ndarray | torch.Tensor]]:
    """A list (or tuple) of frames as batches of one size: [(positions in the list, (n, H, W, 3) batch)],
    each frame checked as :func:`check_frames` does; a single array or tensor is one batch."""
    if not isinstance(frames, (list, tuple)):
        batch = check_frames(frames)
        return [(list(range(len(batch))), batch)]
    if not frames:
        raise EdgehebbError("empty list: no frame to predict")
    checked = []
    for i, f in enumerate(frames):
        if isinstance(f, (list, tuple)) or getattr(f, "ndim", None) != 3:
            raise EdgehebbError(f"frames[{i}] must be one frame (H, W, 3), got "
                                f"{getattr(f, 'shape', type(f).__name__)}")
        try:
            checked.append(check_frames(f))
        except EdgehebbError as e:
            raise EdgehebbError(f"frames[{i}]: {e}") from None
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(checked):
        key = (type(f), tuple(f.shape), str(getattr(f, "device", "cpu")))
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        parts = [checked[i] for i in idx]
        batch = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(parts)
        out.append((idx, batch))
    return out


def check_not_upscaled(shape: tuple[int, ...], size: tuple[int, int], fit: str) -> None:
    """Refuse frames of ``shape`` (N, h, w, 3) whose region that reaches the model (the whole frame, or
    the centred crop) is smaller than the model's ``size``: they would be stretched up, silently."""
    h, w = int(shape[1]), int(shape[2])
    rows, cols = crop_box(h, w, size)[2:] if fit == "center-crop" else (h, w)
    if rows < size[0] or cols < size[1]:
        region = "" if fit == "resize" else f" (its centred crop is {rows}x{cols})"
        raise EdgehebbError(f"a {h}x{w} frame{region} is smaller than the model's {size[0]}x{size[1]} input: it "
                            f"would be stretched up; pass upscale=True to Runtime to allow it")
