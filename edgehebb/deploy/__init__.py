"""Stage 4 of the pipeline: ship a trained model and run it where cameras are.

- :mod:`~edgehebb.deploy.op`: the custom op's contract (domain, name, versions, attributes, metadata
  keys) and OP_SPEC's parity metric, in one place;
- :mod:`~edgehebb.deploy.onnx_op` / :mod:`~edgehebb.deploy.onnx_export` / :mod:`~edgehebb.deploy.onnx_standard`:
  the op's ONNX function, the exported graph, and its standard-ops form;
- :mod:`~edgehebb.deploy.tensorrt_plan` / :mod:`~edgehebb.deploy.tensorrt_engine`: TensorRT decisions as
  data, and the thin layer that builds and runs engines;
- :mod:`~edgehebb.deploy.frames`: camera frames to model input, the same code for every backend;
- :mod:`~edgehebb.deploy.runtime` and :mod:`edgehebb.deploy.backends`: ``edgehebb.Runtime`` and one module
  per inference backend;
- :mod:`~edgehebb.deploy.fused`: the fused NNL inference kernel's host side (PyCUDA);
- :mod:`~edgehebb.deploy.bench`: accuracy and latency per backend (``edgehebb bench``);
- :mod:`~edgehebb.deploy.triton_repo` / :mod:`~edgehebb.deploy.triton_server`: Triton Inference Server model
  repositories (``edgehebb export --triton``) and a real server over one (``edgehebb serve``), with
  :mod:`~edgehebb.deploy.triton_python_model`, the python backend's ``model.py``.

Heavy optional dependencies (onnxruntime, cv2, tensorrt, pycuda) are imported only where used.
"""
