"""edgehebb: learn convolutional filters with the Krotov-Hopfield local rule and ship them to edge GPUs.

``import edgehebb`` loads only the base dependencies; pycuda, tensorrt and onnxruntime-gpu are
imported inside the functions that need them. ``edgehebb.Runtime`` (and ``Prediction``) load
:mod:`edgehebb.runtime`, and with it torch, on first use.
"""

__version__ = "0.1.0"

from edgehebb.errors import EdgehebbError

__all__ = ["EdgehebbError", "Prediction", "Runtime", "__version__"]

_LAZY = {"Runtime": "edgehebb.deploy.runtime", "Prediction": "edgehebb.deploy.runtime"}


def __getattr__(name: str):
    # PEP 562: `from edgehebb import Runtime` works without `import edgehebb` paying for torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgehebb' has no attribute {name!r}")
