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
