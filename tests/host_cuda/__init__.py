"""Build edgehebb's CUDA kernels for the CPU (cuda_host.h emulates CUDA's thread model) and call them.

``build(kernel_file, defines, wrapper)`` compiles one translation unit, the shim, the kernel source
from ``cuda/`` with its ``-D`` constants, and a C wrapper that launches it, into a shared library
(cached per source text and constants under the pytest temp folder), loaded with ctypes. Needs g++
with C++20; tests skip without it.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgehebb.resources import cuda_source

SHIM = Path(__file__).with_name("cuda_host.h")
_CACHE: dict[str, ctypes.CDLL] = {}


def compiler() -> str | None:
    return shutil.which("g++")


def build(kernel_file: str, defines: list[str], wrapper: str) -> ctypes.CDLL:
    """The kernel ``kernel_file`` compiled for the host with ``defines`` (``-DNAME=value`` strings)."""
    source = (f'#include "{SHIM}"\n' + cuda_source(kernel_file) + "\n" + wrapper)
    key = hashlib.sha256("\0".join([source, *defines]).encode()).hexdigest()[:20]
    if key in _CACHE:
        return _CACHE[key]
    folder = Path(tempfile.gettempdir()) / "edgehebb-host-cuda"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{key}.so"
    if not lib.exists():
        src = folder / f"{key}.cpp"
        src.write_text(source)
        tmp = folder / f"{key}.{id(source)}.so"
        out = subprocess.run([compiler() or "g++", "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC",
                              "-Wno-unused-variable", *defines, "-o", str(tmp), str(src)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"host build of {kernel_file} failed:\n{out.stderr[-4000:]}")
        tmp.replace(lib)  # atomic: parallel test workers never load a half-written library
    _CACHE[key] = ctypes.CDLL(str(lib))
    return _CACHE[key]


# ------------------------------------------------------------------------------------------------
# cuda/nnl_forward.cu

_NNL_WRAPPER = """
extern "C" void host_nnl_forward(int gx, int gy, int threads, long long shared, const float* x,
                                 const float* mct, float* y, int K, int ystride, float power, float eps) {
    host_cuda::launch(gx, gy, threads, (size_t)shared, false,
                      [=] { nnl_forward(x, mct, y, K, ystride, power, eps); });
}
"""


def nnl_features(net, x, shared_limit: int, **shape):
    """``FusedNet(net, **shape).features(x)`` computed by the host build of the kernel (CPU tensors)."""
    import numpy as np
    import torch

    from edgehebb.nnl_fused import KERNEL_FILE, block_launches, layer_eps

    x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    launches = block_launches(net, shared_limit, **shape)
    dim = sum(launch.width for launch in launches)
    out = np.full((x.shape[0], dim), np.nan, dtype=np.float32)  # NaN: a column the kernel never wrote
    ptr = ctypes.POINTER(ctypes.c_float)
    for launch in launches:
        lib = build(KERNEL_FILE, launch.plan.options, _NNL_WRAPPER)
        filters = np.ascontiguousarray(launch.filters.cpu().numpy(), dtype=np.float32)
        column = out[:, launch.offset:]  # a view: the kernel writes through the row stride
        lib.host_nnl_forward(
            ctypes.c_int(x.shape[0]), ctypes.c_int(launch.plan.chunks), ctypes.c_int(launch.plan.threads),
            ctypes.c_longlong(launch.plan.shared_bytes), x.ctypes.data_as(ptr), filters.ctypes.data_as(ptr),
            ctypes.cast(column.ctypes.data, ptr), ctypes.c_int(launch.block.filters), ctypes.c_int(dim),
            ctypes.c_float(launch.block.power), ctypes.c_float(layer_eps(net)))
    return torch.from_numpy(out)
