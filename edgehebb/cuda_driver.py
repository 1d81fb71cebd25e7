"""pycuda, imported lazily and shared by the two kernels (learning: learn_pycuda, inference: nnl_fused).

Both run in the device's *primary* context, the one torch uses, so pycuda kernels and torch tensors
share memory: a kernel can take ``tensor.data_ptr()``. Without pycuda, a GPU or nvcc, the helpers
raise one ``EdgehebbError`` line saying what is missing.
"""

from __future__ import annotations

import shutil

from edgehebb.errors import EdgehebbError, require

_CONTEXTS: dict[int, object] = {}
_MODULES: dict[tuple, object] = {}


def driver(why: str = "needed by the pycuda kernels"):
    """``pycuda.driver``, or the install line."""
    return require("pycuda.driver", package="pycuda", extra="gpu", why=why)


def context(ordinal: int, fallback: str = "use --backend torch"):
    """The device's primary context (the one torch uses too), retained once per process."""
    cuda = driver()
    if ordinal not in _CONTEXTS:
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as e:
            raise EdgehebbError(f"pycuda found no usable CUDA driver ({e}); {fallback}") from e
        if count == 0:
            raise EdgehebbError(f"the pycuda kernels need an NVIDIA GPU and none was found; {fallback}")
        if not 0 <= ordinal < count:
            raise EdgehebbError(f"CUDA device {ordinal} does not exist ({count} found)")
        _CONTEXTS[ordinal] = cuda.Device(ordinal).retain_primary_context()
    return _CONTEXTS[ordinal]


class Active:
    """Makes a context current for a block of pycuda calls and restores the previous one."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        self.ctx.push()
        return self.ctx

    def __exit__(self, *exc):
        self.ctx.pop()
        return False


def available() -> bool:
    """True when pycuda imports, a CUDA GPU is present and nvcc can compile kernels; never raises."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0 and shutil.which("nvcc") is not None
    except Exception:
        return False


def compiled_module(ordinal: int, source: str, options: list[str], fallback: str = "use --backend torch"):
    """A ``SourceModule`` for ``source`` compiled with ``options``, once per process and device.

    pycuda also caches the cubin on disk (~/.cache/pycuda), so a variant compiles once per machine.
    Call with the device's context current.
    """
    key = (ordinal, source, tuple(options))
    if key not in _MODULES:
        if shutil.which("nvcc") is None:
            raise EdgehebbError(f"the pycuda kernels are compiled at run time and need nvcc (the CUDA toolkit) "
                                f"on PATH; install it or {fallback}")
        from pycuda.compiler import SourceModule

        _MODULES[key] = SourceModule(source, options=list(options), no_extern_c=True)
    return _MODULES[key]
