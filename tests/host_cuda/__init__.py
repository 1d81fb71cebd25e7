"""Build edgehebb's CUDA kernels for the CPU (cuda_host.h emulates CUDA's thread model) and call them.

``build(kernel_file, defines, wrapper)`` compiles one translation unit, the shim, the kernel source
from ``cuda/`` with its ``-D`` constants, and a C wrapper that launches it, into a shared library,
loaded with ctypes. ``build_source`` does the same for any C++ source.

The libraries are cached by content: the key is a SHA-256 of the compiler (its path and version), the
flags, and the bytes of every file the compiler reads (the source and every header it includes, system
headers too, as ``g++ -M`` lists them). A changed header, shim, kernel or flag is a new key, hence a
fresh build (tests/test_host_cuda.py proves it). The cache folder is versioned
(``$XDG_CACHE_HOME/edgehebb/test-host-cuda/v2``, by default under ``~/.cache``): one build per key
serves every later run, and nothing in it can be stale. Needs g++ with C++20; without it the host-build
tests fail, saying so (they are CI's only run of the kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from edgehebb.resources import cuda_source

SHIM = Path(__file__).with_name("cuda_host.h")
CACHE_VERSION = "v2"   # bump when the key's recipe changes
FLAGS = ["-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wno-unused-variable"]
_LOADED: dict[str, ctypes.CDLL] = {}            # key -> library, in this process
_DEPS: dict[tuple[str, ...], list[Path]] = {}   # (source file, flags) -> the files the compiler read
_COMPILER: tuple[str, str] | None = None


def compiler() -> str | None:
    return shutil.which("g++")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgehebb" / "test-host-cuda" / CACHE_VERSION


def _compiler_id() -> tuple[str, str]:
    """(path of g++, its identity: resolved path, full version and target), looked up once."""
    global _COMPILER
    if _COMPILER is None:
        gxx = compiler()
        if gxx is None:
            raise RuntimeError("the host builds of the CUDA kernels need g++ with C++20 (e.g. apt-get install g++); "
                               "CI has no other way to run the kernels, so these tests fail without it")
        out = subprocess.run([gxx, "-dumpfullversion", "-dumpmachine"], capture_output=True, text=True, check=True)
        _COMPILER = gxx, f"{Path(gxx).resolve()} {' '.join(out.stdout.split())}"
    return _COMPILER


def _read_deps(make_rule: str) -> list[Path]:
    """The prerequisites of a ``g++ -M`` make rule (``target: a.cpp b.h \\`` newline ``c.h``; a space in a
    path is written as backslash-space)."""
    _, _, prereqs = make_rule.replace("\\\n", " ").partition(": ")
    return [Path(p.replace("\\ ", " ")) for p in re.split(r"(?<!\\)\s+", prereqs.strip()) if p]


def _deps(src: Path, flags: list[str], refresh: bool = False) -> list[Path]:
    """Every file compiling ``src`` with ``flags`` reads (``g++ -M``), remembered in this process."""
    memo = (str(src), *flags)
    if refresh or memo not in _DEPS:
        out = subprocess.run([_compiler_id()[0], *flags, "-M", str(src)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"g++ -M {src.name} failed:\n{out.stderr[-4000:]}")
        _DEPS[memo] = _read_deps(out.stdout)
    return _DEPS[memo]


def content_key(src: Path, flags: list[str], deps: list[Path]) -> str:
    """SHA-256 of the compiler, ``flags`` and the bytes of every file in ``deps``."""
    h = hashlib.sha256(f"{_compiler_id()[1]}\0{' '.join(flags)}\0".encode())
    for dep in deps:
        try:
            data = dep.read_bytes()
        except OSError:   # a header that is gone: the compile will say so
            data = b"<missing>"
        h.update(f"{dep}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:24]


def build_source(source: str, defines: list[str] = (), name: str = "unit") -> ctypes.CDLL:
    """``source`` (C++) compiled with ``defines`` into a shared library, cached by content (module doc)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:20]}.cpp"
    if not src.exists() or src.read_text() != source:
        tmp = src.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(src)
    flags = [*FLAGS, *defines]
    fresh = (str(src), *flags) not in _DEPS
    key = content_key(src, flags, _deps(src, flags))
    if key in _LOADED:
        return _LOADED[key]
    if not fresh:   # a header changed since the list was made: it may include other files now
        key = content_key(src, flags, _deps(src, flags, refresh=True))
    lib = folder / f"{name}-{key}.so"
    if not lib.exists():
        tmp = folder / f"{name}-{key}.{os.getpid()}.so.tmp"
        out = subprocess.run([_compiler_id()[0], *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
        if out.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"host build of {name} failed:\n{out.stderr[-4000:]}")
        tmp.replace(lib)  # atomic: parallel test runs never load a half-written library
    _LOADED[key] = ctypes.CDLL(str(lib))
    return _LOADED[key]


def build(kernel_file: str, defines: list[str], wrapper: str) -> ctypes.CDLL:
    """The kernel ``kernel_file`` compiled for the host with ``defines`` (``-DNAME=value`` strings)."""
    source = f'#include "{SHIM}"\n' + cuda_source(kernel_file) + "\n" + wrapper
    return build_source(source, list(defines), Path(kernel_file).stem)


# ------------------------------------------------------------------------------------------------
# cuda/nnl_forward.cu

_NNL_WRAPPER = """
extern "C" void host_nnl_forward(int gx, int gy, int threads, long long shared, const float* x,
                                 const float* mct, float* y, int K, int ystride, float power, float eps,
                                 float sigma2) {
    host_cuda::launch(gx, gy, threads, (size_t)shared, false,
                      [=] { nnl_forward(x, mct, y, K, ystride, power, eps, sigma2); });
}
"""


def nnl_features(net, x, shared_limit: int, **shape):
    """``FusedNet(net, **shape).features(x)`` computed by the host build of the kernel (CPU tensors)."""
    import numpy as np
    import torch

    from edgehebb.nnl import colour_normalise
    from edgehebb.deploy.fused import KERNEL_FILE, block_launches, layer_eps

    x = colour_normalise(x.detach().cpu(), net.spec.colour_norm)   # in torch, as FusedNet.features does
    launches = block_launches(net, shared_limit, **shape)
    dim = sum(launch.width for launch in launches)
    out = np.full((len(x), dim), np.nan, dtype=np.float32)  # NaN: a column the kernel never wrote
    ptr = ctypes.POINTER(ctypes.c_float)
    for launch in launches:
        lib = build(KERNEL_FILE, launch.plan.options, _NNL_WRAPPER)
        filters = np.ascontiguousarray(launch.filters.cpu().numpy(), dtype=np.float32)
        column = out[:, launch.offset:]  # a view: the kernel writes through the row stride
        with torch.no_grad():
            image = np.ascontiguousarray(launch.input(x).numpy(), dtype=np.float32)   # whitened in torch, as on the GPU
        lib.host_nnl_forward(
            ctypes.c_int(x.shape[0]), ctypes.c_int(launch.plan.chunks), ctypes.c_int(launch.plan.threads),
            ctypes.c_longlong(launch.plan.shared_bytes), image.ctypes.data_as(ptr), filters.ctypes.data_as(ptr),
            ctypes.cast(column.ctypes.data, ptr), ctypes.c_int(launch.block.filters), ctypes.c_int(dim),
            ctypes.c_float(launch.block.power), ctypes.c_float(layer_eps(net)),
            ctypes.c_float(launch.block.sigma ** 2))
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------
# cuda/hebbian_step.cu

_HEBBIAN_WRAPPER = """
extern "C" void host_hebbian_run(int blocks, int threads, long long shared, const unsigned char* images,
                                 int H, int Wd, int nx, int per_image, const int* order, int B, int nsteps,
                                 float eps, float power, float delta, float* M, float* MpT, float* ds,
                                 unsigned long long* acc, unsigned int* scale_bits, unsigned int* wins,
                                 unsigned int* barrier, int* dbg_win, int* dbg_rank, int resident) {
    host_cuda::launch(blocks, 1, threads, (size_t)shared, true, [=] {  // all blocks at once: grid barriers
        hebbian_run(images, H, Wd, nx, per_image, order, B, nsteps, eps, power, delta, M, MpT, ds, acc,
                    scale_bits, wins, barrier, dbg_win, dbg_rank);
    }, resident);
}
"""


class HostHebbian:
    """``learn_pycuda.PycudaLearner``'s ``run_detail`` / ``weights`` on the host build of the kernel.

    The same plan (``kernel_plan``), the same buffers and layouts (M, Mp^T padded to KP, the
    fixed-point accumulator, the barrier's fault word), one launch per call. ``blocks`` OS-thread
    blocks of 256 threads run at once, so keep it small (1-3); with ``resident`` < ``blocks`` only that
    many run at first, the rest once they have finished (a GPU without room for the whole grid).
    """

    def __init__(self, images, cfg, weights, *, blocks: int = 2, tile: int | None = None,
                 shared_limit: int = 232448, resident: int | None = None, barrier_timeout_s: float = 300.0):
        import numpy as np

        from edgehebb.learn.pycuda_backend import KERNEL_FILE, kernel_plan, transposed_currents_weights
        from edgehebb.learn.patches import patch_grid

        n, h, w, c = images.shape
        self.images, self.cfg, self.shape = np.ascontiguousarray(images, np.uint8), cfg, (h, w)
        self.ny, self.nx = patch_grid(h, w, cfg.kernel, cfg.stride)
        self.dim = c * cfg.kernel ** 2
        self.plan = kernel_plan(filters=cfg.filters, dim=self.dim, channels=c, kernel=cfg.kernel, stride=cfg.stride,
                                rank=cfg.rank, power=cfg.power, preprocess=cfg.preprocess, batch=cfg.batch,
                                sms=blocks, shared_limit=shared_limit, blocks=blocks, tile=tile,
                                rank_by=cfg.rank_by, barrier_timeout_s=barrier_timeout_s)  # OS threads on a busy CI box: be patient
        self.resident = -1 if resident is None else resident
        self.lib = build(KERNEL_FILE, self.plan.options, _HEBBIAN_WRAPPER)
        K = cfg.filters
        self.M = np.ascontiguousarray(weights.numpy(), np.float32).copy()
        self.MpT = transposed_currents_weights(self.M, cfg.power, self.plan.padded_filters, cfg.rank_by)
        self.ds = np.zeros((K, self.dim), np.float32)
        self.acc = np.zeros((K, self.dim), np.uint64)
        self.barrier = np.zeros(2, np.uint32)  # [counter, fault word]

    def weights(self):
        import torch

        return torch.from_numpy(self.M.copy())

    def run_detail(self, order, eps: float):
        import numpy as np
        import torch

        from edgehebb.learn.pycuda_backend import check_barrier

        cfg, (h, w) = self.cfg, self.shape
        B = cfg.batch
        steps = len(order) // B
        order = np.ascontiguousarray(np.asarray(order)[: steps * B], np.int32)
        wins = np.zeros(cfg.filters, np.uint32)
        scale = np.zeros(2, np.uint32)
        win, ranked = np.zeros(steps * B, np.int32), np.zeros(steps * B, np.int32)

        def p(a):
            return ctypes.c_void_p(a.ctypes.data)

        self.lib.host_hebbian_run(
            ctypes.c_int(self.plan.blocks), ctypes.c_int(self.plan.threads), ctypes.c_longlong(self.plan.shared_bytes),
            p(self.images), ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(self.nx), ctypes.c_int(self.ny * self.nx),
            p(order), ctypes.c_int(B), ctypes.c_int(steps), ctypes.c_float(eps), ctypes.c_float(cfg.power),
            ctypes.c_float(cfg.delta), p(self.M), p(self.MpT), p(self.ds), p(self.acc), p(scale), p(wins),
            p(self.barrier), p(win), p(ranked), ctypes.c_int(self.resident))
        check_barrier(self.barrier, self.plan)
        return (torch.from_numpy(wins.astype(np.int64)), torch.from_numpy(win.astype(np.int64).reshape(steps, B)),
                torch.from_numpy(ranked.astype(np.int64).reshape(steps, B)))
