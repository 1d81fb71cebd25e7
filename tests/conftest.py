"""Shared fixtures: synthetic image folders, the optional real CIFAR-10 copy, assert_close, and a guard
that fails any test leaving process-wide state changed.

Every declared test dependency (pyproject's ``test`` extra) is imported here, so a missing one fails
the whole run at collection instead of skipping the tests that need it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import cv2   # the test extra's opencv-python-headless: Runtime's OpenCV backend, the standard-ops export
import numpy as np
import onnxruntime  # noqa: F401  (a package dependency; imported here so its absence fails collection)
import pytest
import torch
import torch._dynamo  # noqa: F401  (edgehebb.nnl's @torch.compiler.disable imports it, and its first import
                      # sets TORCHINDUCTOR_CACHE_DIR in os.environ: done here, before the guard below looks)

from edgehebb import threads as thread_policy


def _global_state() -> dict:
    """What one test may not leave changed for the next: thread pools and edgehebb's thread policy, the
    environment, cwd, sys.path and the SIGINT/SIGTERM handlers."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}   # pytest's own, per phase
    return {"torch threads": torch.get_num_threads(), "OpenCV threads": cv2.getNumThreads(),
            "edgehebb --threads": thread_policy.requested(), "environment": env, "cwd": os.getcwd(),
            "sys.path": list(sys.path),
            "signal handlers": {s.name: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}}


def _restore(state: dict) -> None:
    torch.set_num_threads(state["torch threads"])
    cv2.setNumThreads(state["OpenCV threads"])
    thread_policy.configure(state["edgehebb --threads"])
    for name, handler in state["signal handlers"].items():
        signal.signal(signal.Signals[name], handler)
    for key in set(os.environ) - set(state["environment"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[key]
    os.environ.update(state["environment"])
    os.chdir(state["cwd"])
    sys.path[:] = state["sys.path"]


@pytest.fixture(autouse=True)
def leaves_no_global_state_changed():
    """Fails (at teardown) a test that changes torch's or OpenCV's thread count, edgehebb's --threads
    policy, os.environ, the working directory, sys.path or the SIGINT/SIGTERM handlers and does not put
    it back; it restores them first, so the next test starts clean. monkeypatch's changes are undone
    before this runs. Warning filters need no guard: pytest restores them around every test."""
    before = _global_state()
    yield
    after = _global_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        _restore(before)
        lines = []
        for what, (was, now) in changed.items():
            if isinstance(was, dict):
                keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
                lines.append(f"{what}: {', '.join(f'{k}={was.get(k)!r}->{now.get(k)!r}' for k in keys)}")
            elif isinstance(was, list):
                added, removed = Counter(now) - Counter(was), Counter(was) - Counter(now)
                lines.append(f"{what}: added {list(added.elements())}, removed {list(removed.elements())}")
            else:
                lines.append(f"{what}: {was!r} -> {now!r}")
        pytest.fail("the test left process-wide state changed (restore it, e.g. with monkeypatch or a "
                    "fixture):\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture
def one_opencv_thread():
    """OpenCV DNN on one thread for this test (the machine is shared), set back afterwards."""
    saved = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(saved)


def assert_close(actual, expected, rtol: float, atol: float, what: str = "values") -> None:
    """Like torch.testing.assert_close, but names the worst element and its index."""
    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN in result"
    err = (a - e).abs() - (atol + rtol * e.abs())
    worst = int(err.flatten().argmax())
    if err.flatten()[worst] > 0:
        idx = np.unravel_index(worst, tuple(a.shape))
        raise AssertionError(f"{what}: worst element {idx}: {a.flatten()[worst].item():.8g} vs "
                             f"{e.flatten()[worst].item():.8g} (rtol={rtol}, atol={atol})")


def assert_compiles_without_spills(kernel_file: str, options: list[str], tmp_path: Path) -> None:
    """nvcc -Xptxas -v on a cuda/ kernel for sm_90 (the H100) with ``options``: it builds and spills nothing."""
    import subprocess

    from edgehebb.resources import cuda_source

    src = tmp_path / kernel_file
    src.write_text(cuda_source(kernel_file))
    out = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", *options,
                          "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)
    assert spills and all(n == "0" for n in spills), out.stderr   # every kernel of the module


@pytest.fixture
def ort_cuda_unusable(monkeypatch):
    """onnxruntime as on a machine with onnxruntime-gpu but no usable GPU, CUDA or cuDNN: it lists the
    CUDA provider, then a session falls back to the CPU silently (with ORT's own warning, ignored)."""
    import warnings

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified provider", UserWarning)
        yield


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    path = os.environ.get("EDGEHEBB_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip("real-data test: set EDGEHEBB_DATA to a CIFAR-10 copy (CI uses ../shared/data/cifar10)")
    return Path(path)


@pytest.fixture(scope="session")
def cifar_head(cifar_root, tmp_path_factory) -> Path:
    """The first 20 images of each class of both splits of the CIFAR-10 copy, copied into an image-folder
    tree: what a class-balanced limit of up to 200 takes from the copy itself. For the tools run on a few
    real images: with EDGEHEBB_CACHE in tmp_path they decode these 400, not 60,000 again (~20 s), and
    leave ~/.cache/edgehebb alone. A copy held in arrays (.npz, CIFAR pickles) is never decoded: as it is."""
    import shutil

    if not (cifar_root / "train").is_dir():
        return cifar_root
    out = tmp_path_factory.mktemp("cifar-head")
    for split in ("train", "test"):
        for cls in sorted(d for d in (cifar_root / split).iterdir() if d.is_dir() and not d.name.startswith(".")):
            (out / split / cls.name).mkdir(parents=True)
            for image in sorted(f for f in cls.iterdir() if not f.name.startswith("."))[:20]:
                shutil.copy2(image, out / split / cls.name / image.name)
    return out


@pytest.fixture(scope="session")
def whitened_model(tmp_path_factory) -> tuple[Path, dict]:
    """A small whitened model trained once (tests/test_whitening.py's SPEC: K=12 over whitened 4x4 patches,
    eps 0.1) on 90 gratings, and train_to_dir's record. Shared: read it, write nothing into it."""
    from edgehebb.nnl import spec_from_dict
    from edgehebb.nnl.train import TrainConfig, train_to_dir
    from tests.test_train import _gratings
    from tests.test_whitening import SPEC

    out = tmp_path_factory.mktemp("whitened") / "m"
    record = train_to_dir(spec_from_dict(SPEC), _gratings(90, 0), out,
                          training=TrainConfig(epochs=8, batch=32, lr=1e-2, val_fraction=0.2),
                          learn={"epochs": 1, "batch": 50}, backend="torch", device="cpu", progress=False,
                          log=lambda line: None, cache="")
    return out, record


@pytest.fixture
def image_tree(tmp_path, monkeypatch) -> Path:
    """A tiny image-folder tree: train/ and test/ with 3 classes of 8 random 16x16 PNGs each. Its decode
    cache goes to tmp_path (EDGEHEBB_CACHE), not one new entry in ~/.cache/edgehebb per test."""
    from PIL import Image

    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "frog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return tmp_path / "data"


@pytest.fixture
def images() -> np.ndarray:
    """Structured synthetic images (oriented gratings plus noise) for learning tests."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:16, 0:16]
    out = []
    for _ in range(40):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        colour = rng.uniform(0.2, 1.0, 3)
        img = 128 + 100 * wave[..., None] * colour + rng.normal(0, 10, (16, 16, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)
