"""The TensorRT backend: an engine built by ``edgehebb export --trt``, on CUDA (tensorrt imported only here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from edgehebb.deploy import op
from edgehebb.deploy.backends.base import Backend, Staging
from edgehebb.deploy.backends.onnx_file import check_baked
from edgehebb.deploy.frames import crop_box, frames_to_tensor
from edgehebb.errors import EdgehebbError, require


class TrtBackend(Backend):
    name = "tensorrt"
    targets = ("engine",)
    devices = ("cuda",)

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install 'edgehebb[gpu]')"
        if not torch.cuda.is_available():
            return f"no CUDA GPU visible to torch {torch.__version__}"
        return None

    def __init__(self, engine: Path, device: str, channel_order: str, fit: str, *, threads: int | None = None):
        require("tensorrt", extra="gpu", why="the tensorrt backend runs .engine files")
        from edgehebb.deploy.tensorrt_engine import TrtRunner
        from edgehebb.deploy.tensorrt_plan import sidecar_path

        self.device = torch.device(device)
        self.runner = TrtRunner(engine, self.device.index or 0)   # checks the GPU, the file and the sidecar
        self.classes = [str(c) for c in (self.runner.classes or [])]
        if not self.classes:
            raise EdgehebbError(f"{engine} has no class names: its sidecar {sidecar_path(engine).name} is missing "
                                f"or incomplete; rebuild it with `edgehebb export --trt`")
        self.min_batch, self.max_batch = self.runner.min_batch, self.runner.max_batch
        self.channel_order, self.fit, self.flip = channel_order, fit, False
        self.baked = self.runner.input_dtype == torch.uint8   # a ``frames`` engine: preprocessing inside
        if self.baked:
            # Which channel order / fit were baked in: the sidecar's copy of the ONNX metadata, or the ONNX file.
            meta = source_onnx_metadata(engine, sidecar_path(engine))
            if meta is None:
                raise EdgehebbError(f"{engine} takes uint8 frames with preprocessing baked in, but neither its sidecar "
                                    f"nor an ONNX file beside it says which channel order and fit: rebuild it with "
                                    f"`edgehebb export --trt`, or copy the ONNX file next to the engine")
            self.flip = check_baked(meta, channel_order, fit, engine)
            _, h, w = json.loads(meta[op.META_SPEC])["input"]
        else:
            _, h, w = self.runner.sample_shape
        self.input_size = (int(h), int(w))
        # a frames engine has one frame size (TensorRT profiles fix all but the batch): (H, W, 3)
        self.frame_size = tuple(int(d) for d in self.runner.sample_shape[:2]) if self.baked else None
        self._staging = Staging(self.device)

    def prepare(self, frames) -> torch.Tensor:
        x = self._staging.put(frames)
        if self.baked:
            if self.fit == "center-crop":
                crop_box(x.shape[1], x.shape[2], self.input_size)  # the engine's crop must not be empty
            return x.flip(-1) if self.flip else x
        return frames_to_tensor(x, self.input_size, self.channel_order, self.fit)

    def forward(self, x: torch.Tensor) -> dict:
        return self.runner.infer(x)   # synchronous; the outputs are views the next call overwrites

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        super().close()
        self.runner = None


def source_onnx_metadata(engine: Path, sidecar: Path) -> dict | None:
    """edgehebb metadata of the ONNX file an engine was built from: the copy in the sidecar (engines
    built since the sidecar carried it), else the ONNX file itself if it lies beside the engine."""
    try:
        source = json.loads(sidecar.read_text())["onnx"]
        name = source["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(source.get("metadata"), dict) and op.META_SPEC in source["metadata"]:
        return {str(k): str(v) for k, v in source["metadata"].items()}
    onnx_path = engine.parent / name
    return op.read_metadata(onnx_path) if onnx_path.is_file() else None
