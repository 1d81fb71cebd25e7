"""The OpenCV DNN backend: an edgehebb .onnx file (a custom-op file is converted to standard ops in memory)
run by ``cv2.dnn`` on the CPU."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np

from edgehebb.deploy import op
from edgehebb.deploy.backends.onnx_file import OnnxFileBackend
from edgehebb.errors import EdgehebbError, require


def import_cv2():
    return require("cv2", package="opencv-python-headless", why="the opencv backend runs .onnx files with OpenCV DNN")


class OpenCVBackend(OnnxFileBackend):
    """OpenCV DNN (``cv2.dnn``, its default engine) on the CPU. OpenCV ignores model-local functions, so a
    custom-op file is converted to standard ops in memory first; a ``--standard-ops`` export is read as it
    is. OpenCV runs on its own thread pool, all cores by default: ``cv2.setNumThreads(n)`` sets it for
    the whole process (on cores shared with other jobs, fewer threads are often faster)."""

    name = "opencv"
    cpu_chunk = 2

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if importlib.util.find_spec("cv2") is None:
            return "opencv-python-headless is not installed (pip install opencv-python-headless)"
        return None

    def __init__(self, onnx_path: Path, device: str, channel_order: str, fit: str, *, threads: int | None = None):
        cv2 = import_cv2()
        from edgehebb.deploy.onnx_standard import standard_ops, uses_custom_ops

        model = op.load_onnx(onnx_path)
        meta = op.read_metadata(onnx_path, model)
        if uses_custom_ops(model):
            model = standard_ops(model)
        self.device = device
        inp = model.graph.input[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        self._describe(onnx_path, meta, inp.name, dims, channel_order, fit)
        self.output_names = [o.name for o in model.graph.output]   # OpenCV's new engine returns all or none
        read = getattr(cv2.dnn, "readNetFromONNXBuffer", cv2.dnn.readNetFromONNX)   # OpenCV 4 / OpenCV 5
        try:
            self.net = read(np.frombuffer(model.SerializeToString(), np.uint8))
        except cv2.error as e:
            raise EdgehebbError(f"OpenCV {cv2.__version__} cannot load {onnx_path}: {_one_line(e)}") from None
        self._cv2 = cv2

    def prepare(self, frames) -> np.ndarray:
        return self.host_input(frames)

    def forward(self, x: np.ndarray) -> dict:
        self.net.setInput(x, self.input_name)
        try:
            outs = self.net.forward(self.output_names)
        except self._cv2.error as e:
            raise EdgehebbError(f"OpenCV DNN failed on input {x.dtype} {tuple(x.shape)}: {_one_line(e)}") from None
        return dict(zip(self.output_names, outs))

    # synchronize: nothing to wait for, forward() returns finished host arrays

    @contextlib.contextmanager
    def threads_scope(self, threads: int):
        saved = self._cv2.getNumThreads()
        self._cv2.setNumThreads(threads)
        try:
            yield
        finally:
            self._cv2.setNumThreads(saved)

    def close(self) -> None:
        super().close()
        self.net = None


def _one_line(e: Exception, most: int = 400) -> str:
    """A native library's multi-line message (OpenCV's: source location, then the reason) as one line."""
    text = " ".join(line.strip(" >") for line in str(e).splitlines() if line.strip(" >")) or type(e).__name__
    return text if len(text) <= most else text[:most - 3] + "..."
