"""The ONNX Runtime backend: an edgehebb .onnx file (either form) on the CPU or, with onnxruntime-gpu, CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path


from edgehebb.deploy import op
from edgehebb.deploy.backends.base import LruCache
from edgehebb.deploy.backends.onnx_file import OnnxFileBackend
from edgehebb.errors import EdgehebbError, require


def import_onnxruntime():
    return require("onnxruntime", why="the onnxruntime backend runs .onnx files")


class OrtHandle:
    """One input shape's IOBinding, its input OrtValue (refilled in place each call) and outputs."""

    def __init__(self, ort, session, input_name: str, shape: tuple, dtype, device: str):
        self.binding = session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
        self.binding.bind_ortvalue_input(input_name, self.input)
        for o in session.get_outputs():
            self.binding.bind_output(o.name, device, 0)   # ORT's arena reuses output memory between runs
        self.output_names = [o.name for o in session.get_outputs()]


class NoCudaProvider(EdgehebbError):
    """ONNX Runtime lists its CUDA provider but cannot start it here (no GPU, CUDA or cuDNN libraries)."""


class OrtBackend(OnnxFileBackend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    cpu_chunk = 2

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if device.startswith("cuda"):
            ort = import_onnxruntime()
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                        f"(install onnxruntime-gpu: pip install 'edgehebb[gpu]')")
        return None

    def __init__(self, onnx_path: Path, device: str, channel_order: str, fit: str, *, threads: int | None = None):
        ort = import_onnxruntime()
        self._ort = ort
        meta = op.read_metadata(onnx_path)
        self.device = device
        # No TF32 on CUDA: it rounds the head's inputs to 10-bit mantissas (~1e-3 relative), enough to
        # flip near-tied predictions against the torch and CPU results.
        providers = ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if device == "cuda"
                     else ["CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.log_severity_level = 3   # ORT's warnings (e.g. unused initialisers) are not the user's business
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgehebbError(f"onnxruntime cannot load {onnx_path}: {first}") from None
        self.providers = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            # ORT falls back to the CPU silently when the CUDA provider cannot load (e.g. no cuDNN)
            raise NoCudaProvider(f"onnxruntime could not start its CUDAExecutionProvider for {onnx_path} (are the "
                                f"CUDA and cuDNN libraries onnxruntime-gpu needs installed?); use device='cpu'")
        inp = self.session.get_inputs()[0]
        self._describe(onnx_path, meta, inp.name, inp.shape, channel_order, fit)
        self._handles = LruCache()

    def prepare(self, frames) -> OrtHandle:
        x = self.host_input(frames)
        handle = self._handles.get_or_make(x.shape, lambda: OrtHandle(
            self._ort, self.session, self.input_name, x.shape, x.dtype, self.device))
        handle.input.update_inplace(x)   # host -> the bound input buffer (on the GPU with CUDA)
        return handle

    def forward(self, handle: OrtHandle) -> dict:
        self.session.run_with_iobinding(handle.binding)
        handle.binding.synchronize_outputs()
        return dict(zip(handle.output_names, handle.binding.get_outputs()))

    # synchronize: nothing to wait for, run_with_iobinding returns after the outputs are synchronised

    def close(self) -> None:
        super().close()
        self._handles.clear()
        self.session = None
