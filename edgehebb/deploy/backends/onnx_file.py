"""What the ONNX Runtime and OpenCV backends share: an edgehebb .onnx file's metadata, and its input made
on the host (uint8 frames for a file with the preprocessing baked in, else float images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgehebb.deploy import op
from edgehebb.deploy.backends.base import Backend, Staging
from edgehebb.deploy.frames import crop_box, frames_to_tensor
from edgehebb.errors import EdgehebbError
from edgehebb.nnl.spec import map_floats, spec_from_dict


class OnnxFileBackend(Backend):
    """An edgehebb .onnx file's classes, input size and baked-in preprocessing (:meth:`_describe`), and
    its input made on the host (:meth:`host_input`)."""

    targets = ("model", "onnx")   # a model directory is exported to a temporary .onnx first

    def _describe(self, path: Path, meta: dict, input_name: str, dims: list, channel_order: str, fit: str) -> None:
        self.classes = [str(c) for c in op.json_metadata(meta, op.META_CLASSES, path)]
        spec = op.json_metadata(meta, op.META_SPEC, path)
        _, h, w = spec["input"]
        self.input_size = (int(h), int(w))
        try:
            self.map_floats = map_floats(spec_from_dict(spec, str(path)))
        except EdgehebbError:   # a spec this edgehebb cannot read: the chunk stays cpu_chunk
            self.map_floats = None
        self.input_name = input_name
        # Baked-in preprocessing: the graph takes uint8 frames (N, h, w, 3) and resizes them itself.
        self.baked = input_name == "frames"
        self.channel_order, self.fit = channel_order, fit
        self.flip = check_baked(meta, channel_order, fit, path) if self.baked else False
        self.frame_size = None          # (H, W) when the file takes frames of one size only
        if self.baked:
            self._frame_dims = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:3])
            if None not in self._frame_dims:
                self.frame_size = self._frame_dims
        self._staging = Staging(torch.device("cpu"))   # preprocessing runs on the host

    def host_input(self, frames) -> np.ndarray:
        if self.baked:
            x = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
            want = self._frame_dims
            if any(d is not None and d != s for d, s in zip(want, x.shape[1:3])):
                raise EdgehebbError(f"this ONNX file takes frames of {want[0]}x{want[1]} (H x W), got "
                                    f"{x.shape[1]}x{x.shape[2]}")
            if self.fit == "center-crop":
                crop_box(x.shape[1], x.shape[2], self.input_size)  # the graph's crop must not be empty
            return np.ascontiguousarray(x[..., ::-1] if self.flip else x, dtype=np.uint8)
        x = frames_to_tensor(self._staging.put(frames), self.input_size, self.channel_order, self.fit).numpy()
        return np.ascontiguousarray(x, dtype=np.float32)



def check_baked(meta: dict, channel_order: str, fit: str, path: Path) -> bool:
    """Whether frames must have R and B swapped before a graph with baked-in preprocessing; a fit it cannot do raises."""
    try:
        baked = json.loads(meta.get(op.META_PREPROCESS, "{}"))
    except json.JSONDecodeError:
        baked = {}
    baked = baked if isinstance(baked, dict) else {}
    if baked.get("fit", fit) != fit:
        raise EdgehebbError(f"{path} has fit={baked['fit']!r} baked in; pass fit={baked['fit']!r} or export "
                            f"without baked preprocessing")
    return baked.get("channel_order", "rgb") != channel_order   # swapping on our side is one cheap flip
