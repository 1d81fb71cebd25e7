"""edgehebb: learn convolutional filters with the Krotov-Hopfield local rule and ship them to edge GPUs.

``import edgehebb`` loads only the base dependencies; pycuda, tensorrt and onnxruntime-gpu are
imported inside the functions that need them.
"""

__version__ = "0.1.0"

from edgehebb.errors import EdgehebbError

__all__ = ["EdgehebbError", "__version__"]
