"""The ``model.py`` of a python-backend Triton repository (``edgehebb export MODEL --triton REPO --triton-backend python``).

This file is copied, as it is, to ``REPO/<name>/1/model.py``. It runs inside Triton's python backend
stub, not inside edgehebb: it imports only the standard library, numpy, onnxruntime and Triton's
``triton_python_backend_utils``, and nothing from edgehebb, so a server with no edgehebb installed
runs it. It executes ``model.onnx`` beside it (uint8 NHWC ``frames`` in; ``logits``,
``probabilities``, ``features`` out) with ONNX Runtime on the CPU.

- **Batching.** Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` several requests at
  once. Their frames are concatenated (per frame size, when the repository takes any size) and run in
  one ONNX Runtime call; each request gets its own rows back.
- **Malformed requests** (not uint8, not (N, H, W, 3), an empty batch) get an error response of their
  own; the other requests of the same batch are served. Triton refuses most of them itself, against
  config.pbtxt, before they get here.
- **numpy 2.** Under numpy 2 the stub's ``Tensor.as_numpy()`` and ``Tensor(name, ndarray)`` return
  wrong numbers without an error (nvidia-pytriton 0.7.0's Triton 2.51), while DLPack is right; under
  numpy 1.x DLPack crashed the stub. So the numpy version picks the path (:data:`USE_DLPACK`). The
  tests compare served outputs with ``edgehebb.Runtime`` on the same file either way.
- ``parameters { key: "intra_op_thread_count" ... }`` in config.pbtxt sets ONNX Runtime's threads
  (the onnxruntime backend's name for it; default 1: the stub shares the cores with the server and
  with the other instances).
"""

from __future__ import annotations

import json
import os

import numpy as np

try:   # present inside Triton's python backend only
    import triton_python_backend_utils as pb_utils
except ImportError:   # pragma: no cover - imported outside a Triton server (e.g. by a test reading this file)
    pb_utils = None

INPUT = "frames"
OUTPUTS = ("logits", "probabilities", "features")
USE_DLPACK = int(np.__version__.split(".")[0]) >= 2


def _to_numpy(tensor) -> np.ndarray:
    if USE_DLPACK:
        return np.from_dlpack(tensor)
    return tensor.as_numpy()


def _to_triton(name: str, array: np.ndarray):
    array = np.ascontiguousarray(array)
    if USE_DLPACK:
        return pb_utils.Tensor.from_dlpack(name, array)
    return pb_utils.Tensor(name, array)


def check_frames(frames: np.ndarray, dims: list) -> str | None:
    """Why ``frames`` cannot be run (one line), or None. ``dims``: config.pbtxt's input dims (-1: any)."""
    if frames.dtype != np.uint8:
        return f"input '{INPUT}' must be uint8 frames, got {frames.dtype}"
    if frames.ndim != 4 or frames.shape[-1] != 3:
        return f"input '{INPUT}' must be (N, H, W, 3) uint8 frames, got shape {list(frames.shape)}"
    if frames.shape[0] == 0:
        return f"input '{INPUT}' holds an empty batch (shape {list(frames.shape)})"
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        return f"input '{INPUT}' frames have no pixels (shape {list(frames.shape)})"
    for want, got in zip(dims[:2], frames.shape[1:3]):
        if want != -1 and want != got:
            return f"input '{INPUT}' frames must be {dims[0]}x{dims[1]}, got {frames.shape[1]}x{frames.shape[2]}"
    return None


class TritonPythonModel:
    """Triton's python-backend interface: initialize once, execute per batch of requests, finalize."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        params = config.get("parameters", {})
        threads = int(params.get("intra_op_thread_count", {}).get("string_value", "1") or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.dims = [int(d) for d in next(i for i in config["input"] if i["name"] == INPUT)["dims"]]
        self.max_batch = int(config.get("max_batch_size", 0)) or None

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict = {}   # (H, W) -> [(request index, frames, requested outputs)]
        for i, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
                if tensor is None:
                    raise ValueError(f"the request has no input '{INPUT}'")
                frames = _to_numpy(tensor)
                problem = check_frames(frames, self.dims)
                if problem is None and self.max_batch and len(frames) > self.max_batch:
                    problem = f"a request holds {len(frames)} frames, more than max_batch_size {self.max_batch}"
                if problem is not None:
                    raise ValueError(problem)
                wanted = [n for n in request.requested_output_names() if n in OUTPUTS] or list(OUTPUTS)
            except Exception as e:  # every request is answered, the others of its batch too
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                continue
            groups.setdefault(frames.shape[1:3], []).append((i, frames, wanted))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members, responses) -> None:
        try:
            batch = np.concatenate([frames for _, frames, _ in members]) if len(members) > 1 else members[0][1]
            outputs = dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), {INPUT: batch})))
        except Exception as e:
            for i, _, _ in members:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed: {e}"))
            return
        start = 0
        for i, frames, wanted in members:
            stop = start + len(frames)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[_to_triton(name, outputs[name][start:stop]) for name in wanted])
            start = stop

    def finalize(self):
        self.session = None
