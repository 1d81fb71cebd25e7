"""edgehebb.Runtime: one predict() over torch, ONNX Runtime, OpenCV DNN and TensorRT, fed with camera frames."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgehebb.errors import EdgehebbError
from edgehebb.deploy.frames import frames_to_tensor
from edgehebb.nnl.model import load_model, save_model
from edgehebb.nnl import NNLNet, spec_from_dict
from edgehebb.deploy.op import VERSIONS as OP_VERSIONS, read_metadata as read_onnx_metadata
from edgehebb.deploy.backends import BACKENDS, CPU_SPEED_ORDER
from edgehebb.deploy.runtime import CUDA_MAX_CHUNK, Prediction, Runtime, chunks
from tests.conftest import assert_close

CLASSES = ["cat", "dog", "frog"]


def tiny_model(out: Path, size: int = 32) -> Path:
    """A saved 1-block NNL model (K=8, W=4, n=4) on 3 x size x size with random filters and head."""
    spec = spec_from_dict({"name": "tiny", "input": [3, size, size], "classes": 3,
                           "blocks": [{"kernel": 4, "filters": 8, "power": 4, "pool": 4}]})
    g = torch.Generator().manual_seed(0)
    net = NNLNet(spec, [torch.randn(8, 3, 4, 4, generator=g)])
    with torch.no_grad():
        net.head.weight.normal_(0, 1, generator=g)
        net.feature_scale.fill_(10.0)   # ReLU(cos)^4 features are small: spread the logits apart
    return save_model(out, net, CLASSES)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("rt") / "tiny")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    # larger than the model's 32 x 32 and of another aspect: every path resizes them down
    return np.random.default_rng(0).integers(0, 256, (5, 48, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def rt(model_dir):
    with Runtime(model_dir, backend="torch", device="cpu") as runtime:   # the reference the others are held to
        yield runtime


def reference(model_dir: Path, frames: np.ndarray, channel_order: str = "rgb") -> torch.Tensor:
    net, _ = load_model(model_dir)
    with torch.no_grad():
        return net(frames_to_tensor(frames, (32, 32), channel_order)).softmax(1)


def test_torch_backend_matches_the_network(rt, model_dir, frames):
    assert (rt.backend, rt.device, rt.classes, rt.input_size) == ("torch", "cpu", CLASSES, (32, 32))
    pred = rt.predict(frames, features=True)
    assert isinstance(pred, Prediction) and len(pred) == 5
    assert pred.class_ids.dtype == np.int64 and pred.probabilities.dtype == np.float32
    assert pred.features.dtype == np.float32 and pred.features.shape[0] == 5
    assert_close(pred.probabilities, reference(model_dir, frames), rtol=1e-5, atol=1e-6, what="probabilities")
    assert pred.names == [CLASSES[i] for i in pred.class_ids]
    assert len(set(pred.class_ids.tolist())) > 1, "the tiny model should not predict one class for all"
    assert rt.predict(frames).features is None


def test_single_frame_batch_and_torch_frames_agree(rt, frames):
    batch = rt.predict(frames)
    for i in (0, 3):
        one = rt.predict(frames[i])
        assert one.probabilities.shape == (1, 3)
        assert_close(one.probabilities[0], batch.probabilities[i], rtol=1e-5, atol=1e-6, what=f"frame {i}")
    assert_close(rt.predict(torch.from_numpy(frames)).probabilities, batch.probabilities, rtol=0, atol=0)


def test_results_are_not_views_of_reused_buffers(rt, frames):
    first = rt.predict(frames[:2])
    kept = first.probabilities.copy()
    rt.predict(frames[2:4])   # same batch shape: the same input buffer is reused
    assert np.array_equal(first.probabilities, kept)


def test_bgr_frames(model_dir, frames):
    with Runtime(model_dir, device="cpu", channel_order="bgr") as bgr, Runtime(model_dir, device="cpu") as rgb:
        assert_close(bgr.predict(frames[..., ::-1].copy()).probabilities, rgb.predict(frames).probabilities,
                     rtol=0, atol=0, what="BGR vs RGB")
        assert_close(bgr.predict(frames).probabilities, reference(model_dir, frames, "bgr"),
                     rtol=1e-5, atol=1e-6, what="BGR reference")


def test_float_frames_are_rounded_to_uint8(rt, frames):
    as_float = frames.astype(np.float32) / 255
    assert_close(rt.predict(as_float).probabilities, rt.predict(frames).probabilities, rtol=0, atol=0)
    assert_close(rt.predict(torch.from_numpy(as_float).double()).probabilities, rt.predict(frames).probabilities,
                 rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32), np.uint8), "ndim 2"),
    (np.zeros((1, 2, 32, 32, 3), np.uint8), "ndim 5"),
    (np.zeros((2, 32, 32, 4), np.uint8), "3 colour channels"),
    (np.zeros((2, 3, 32, 32), np.uint8), "channels first"),
    (np.zeros((0, 32, 32, 3), np.uint8), "empty batch"),
    (np.zeros((2, 0, 32, 3), np.uint8), "no pixels"),
    (np.zeros((2, 32, 32, 3), np.int32), "dtype int32"),
    (np.zeros((2, 32, 32, 3), bool), "dtype bool"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN"),
    (torch.full((2, 32, 32, 3), float("inf")), "NaN or infinite"),
    (np.full((2, 32, 32, 3), 200.0), "must be in [0, 1]"),
    ([[0, 1, 2]], "frames[0] must be one frame"),
    ("frame.png", "numpy array, a torch tensor or a list of them"),
])
def test_bad_frames_name_the_problem(rt, bad, message):
    with pytest.raises(EdgehebbError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rt.predict(bad)


def test_bad_paths_and_options(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    cases = [
        (lambda: Runtime(tmp_path / "empty"), "not a model directory"),
        (lambda: Runtime(tmp_path / "notes.txt"), "is not a model"),
        (lambda: Runtime(tmp_path / "missing.onnx"), "does not exist"),
        (lambda: Runtime("no-such-shipped-model"), "neither a directory nor a shipped model"),
        (lambda: Runtime(tmp_path / "junk.onnx", device="cpu"), "not an"),
        (lambda: Runtime(model_dir, backend="tflite"), "unknown backend"),
        (lambda: Runtime(model_dir, backend="tensorrt"), "needs a .engine file"),
        (lambda: Runtime(model_dir, device="cpu", channel_order="rbg"), "channel order"),
        (lambda: Runtime(model_dir, device="cpu", fit="crop"), "fit"),
        (lambda: Runtime(model_dir, device="tpu"), "device must be"),
    ]
    for make, message in cases:
        with pytest.raises(EdgehebbError, match=message):
            make()


def test_closed_runtime_and_context_manager(model_dir, frames):
    with Runtime(model_dir, device="cpu") as runtime:
        runtime.predict(frames[0])
    with pytest.raises(EdgehebbError, match="closed"):
        runtime.predict(frames[0])
    runtime.close()   # closing twice is fine


def test_steady_state_reuses_the_input_buffer(rt, frames):
    rt.predict(frames)
    buffers = dict(rt._backend._staging._buffers)
    rt.predict(frames)
    assert {k: v[0].data_ptr() for k, v in rt._backend._staging._buffers.items()} == \
        {k: v[0].data_ptr() for k, v in buffers.items()}


def test_shared_runtime_is_safe_across_threads(rt, frames):
    from concurrent.futures import ThreadPoolExecutor

    expected = [rt.predict(frames[i:i + 2]).probabilities for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: rt.predict(frames[i:i + 2]).probabilities, list(range(4)) * 5))
    for k, p in enumerate(got):
        assert np.array_equal(p, expected[k % 4])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_matches_cpu_for_every_kind_of_frames(model_dir, rt, frames):
    want = rt.predict(frames, features=True)
    on_gpu = torch.from_numpy(frames).cuda()
    for what, feed in [("numpy", frames), ("torch cpu", torch.from_numpy(frames)), ("torch cuda", on_gpu),
                       ("float cuda", on_gpu.float() / 255), ("float numpy", frames / 255.0)]:
        with Runtime(model_dir, device="cuda") as gpu:   # a fresh Runtime: the first call allocates the buffers
            for call in range(2):
                got = gpu.predict(feed, features=True)
                assert_close(got.probabilities, want.probabilities, rtol=1e-4, atol=1e-5, what=f"{what}, call {call}")
                assert_close(got.features, want.features, rtol=1e-4, atol=1e-6, what=f"{what} features")


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_steady_state_allocates_nothing(model_dir, frames):
    with Runtime(model_dir, device="cuda") as gpu:
        gpu.predict(frames)
        buffers = {k: (h.data_ptr(), d.data_ptr()) for k, (h, d) in gpu._backend._staging._buffers.items()}
        assert next(iter(buffers.values()))[0] != 0 and torch.cuda.is_available()
        before = torch.cuda.memory_allocated()
        for _ in range(5):
            gpu.predict(frames)
        assert torch.cuda.memory_allocated() == before
        assert {k: (h.data_ptr(), d.data_ptr()) for k, (h, d) in gpu._backend._staging._buffers.items()} == buffers


# ----------------------------------------------------------------------------- ONNX Runtime

def _need_export():
    # onnx and onnxruntime are dependencies of the package: a failing import here is a failure, not a skip
    from edgehebb.deploy.onnx_export import export_onnx

    return export_onnx


def _export(model_dir: Path, out: Path, **kwargs) -> Path:
    return Path(_need_export()(str(model_dir), out, **kwargs))


@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory) -> Path:
    return _export(model_dir, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_onnxruntime_matches_torch(onnx_file, rt, frames):
    with Runtime(onnx_file, device="cpu") as ort_rt:
        assert (ort_rt.backend, ort_rt.classes, ort_rt.input_size) == ("onnxruntime", CLASSES, (32, 32))
        assert ort_rt.providers == ["CPUExecutionProvider"]
        got, want = ort_rt.predict(frames, features=True), rt.predict(frames, features=True)
        assert_close(got.probabilities, want.probabilities, rtol=1e-4, atol=1e-5, what="ORT vs torch probabilities")
        assert_close(got.features, want.features, rtol=1e-4, atol=1e-6, what="ORT vs torch features")
        assert np.array_equal(got.class_ids, want.class_ids)
        one = ort_rt.predict(frames[1])
        assert_close(one.probabilities[0], want.probabilities[1], rtol=1e-4, atol=1e-5, what="ORT single frame")
        kept = got.probabilities.copy()
        ort_rt.predict(frames[::-1].copy(), features=True)   # same shape: same binding
        assert np.array_equal(got.probabilities, kept), "Prediction must not alias ORT's output buffers"


def test_onnxruntime_from_a_model_dir_exports_on_the_fly(model_dir, rt, frames):
    _need_export()
    runtime = Runtime(model_dir, backend="onnxruntime", device="cpu", channel_order="bgr")
    tmp = runtime._tmp
    assert tmp is not None and any(tmp.glob("*.onnx"))
    assert runtime._backend.baked and not runtime._backend.flip, "exported with BGR preprocessing in the graph"
    assert_close(runtime.predict(frames[..., ::-1].copy()).probabilities, rt.predict(frames).probabilities,
                 rtol=1e-4, atol=1e-5, what="ORT (exported on the fly, BGR) vs torch")
    runtime.close()
    assert not tmp.exists(), "close() removes the temporary export"


def test_onnxruntime_with_baked_preprocessing(model_dir, rt, frames, tmp_path):
    path = _export(model_dir, tmp_path / "baked.onnx", preprocess="uint8-nhwc")
    for order, feed in (("rgb", frames), ("bgr", frames[..., ::-1].copy())):
        with Runtime(path, device="cpu", channel_order=order) as baked:
            assert baked._backend.baked
            assert_close(baked.predict(feed).probabilities, rt.predict(frames).probabilities,
                         rtol=1e-4, atol=1e-5, what=f"baked preprocessing, {order} frames")


def _set_metadata(src: Path, dst: Path, key: str, value: str | None) -> Path:
    import onnx

    model = onnx.load(str(src))
    props = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if value is not None:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def test_onnx_op_version_and_foreign_files_are_refused(onnx_file, tmp_path):
    newer = _set_metadata(onnx_file, tmp_path / "v3.onnx", "edgehebb.op_version", str(OP_VERSIONS[-1] + 1))
    with pytest.raises(EdgehebbError, match="op version '3'"):
        Runtime(newer, device="cpu")
    foreign = _set_metadata(onnx_file, tmp_path / "foreign.onnx", "edgehebb.classes", None)
    with pytest.raises(EdgehebbError, match="not an edgehebb ONNX export"):
        Runtime(foreign, device="cpu")
    with pytest.raises(EdgehebbError, match="the torch backend needs a model directory"):
        Runtime(onnx_file, backend="torch")


def test_onnxruntime_cuda_without_the_provider_is_a_clear_error(onnx_file):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(EdgehebbError, match="onnxruntime-gpu"):
        Runtime(onnx_file, device="cuda")


def test_onnxruntime_cuda_listed_but_unable_to_start(onnx_file, frames, ort_cuda_unusable):
    # auto picks the CPU with a warning, device="cuda" refuses
    with pytest.warns(UserWarning, match="could not start its CUDAExecutionProvider.*running on the CPU"):
        auto = Runtime(onnx_file)
    with auto:
        assert auto.device == "cpu" and auto.providers == ["CPUExecutionProvider"]
        assert len(auto.predict(frames).class_ids) == len(frames)
    with pytest.raises(EdgehebbError, match="could not start its CUDAExecutionProvider"):
        Runtime(onnx_file, device="cuda")


def test_batches_below_an_engines_smallest_are_padded(rt, frames):
    # a TensorRT profile may start above 1 (e.g. --batch 4,8,16): fewer frames are padded, then dropped
    want = rt.predict(frames, features=True)
    rt.min_batch = 4
    try:
        for part in (frames[:1], torch.from_numpy(frames[:3].copy()), frames):   # 1, 3 and 5 frames
            got = rt.predict(part, features=True)
            n = len(part)
            assert got.probabilities.shape == (n, len(CLASSES)) and got.features.shape[0] == n
            assert_close(got.probabilities, want.probabilities[:n], rtol=1e-5, atol=1e-7, what="padded batch")
    finally:
        rt.min_batch = 1


@pytest.mark.parametrize("device", ["cudax", "cuda:abc", "gpu"])
def test_malformed_device_is_one_line_error(onnx_file, device):
    with pytest.raises(EdgehebbError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
        Runtime(onnx_file, device=device)


@pytest.mark.gpu
def test_onnxruntime_cuda_matches_torch(onnx_file, rt, frames):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
    with Runtime(onnx_file, device="cuda") as gpu:
        assert gpu.providers[0] == "CUDAExecutionProvider"
        for _ in range(2):
            got = gpu.predict(frames, features=True)
            want = rt.predict(frames, features=True)
            assert_close(got.probabilities, want.probabilities, rtol=1e-3, atol=1e-4, what="ORT CUDA vs torch")
            assert_close(got.features, want.features, rtol=1e-4, atol=1e-6, what="ORT CUDA vs torch features")


# ----------------------------------------------------------------------------- OpenCV DNN

@pytest.mark.usefixtures("one_opencv_thread")
def test_opencv_runs_custom_op_and_standard_ops_files_like_torch(onnx_file, model_dir, rt, frames, tmp_path):
    # a custom-op file is converted to standard ops in memory; a --standard-ops file is read as it is
    standard = _export(model_dir, tmp_path / "std.onnx", standard_ops=True)
    want = rt.predict(frames, features=True)
    for path in (onnx_file, standard):
        with Runtime(path, backend="opencv") as cv_rt:
            assert (cv_rt.backend, cv_rt.device, cv_rt.classes, cv_rt.input_size) == ("opencv", "cpu", CLASSES, (32, 32))
            got = cv_rt.predict(frames, features=True)
            assert_close(got.probabilities, want.probabilities, rtol=1e-4, atol=1e-5, what=f"OpenCV {path.name}")
            assert_close(got.features, want.features, rtol=1e-4, atol=1e-6, what=f"OpenCV {path.name} features")
            assert np.array_equal(got.class_ids, want.class_ids)
            kept = got.probabilities.copy()
            cv_rt.predict(frames[::-1].copy())
            assert np.array_equal(got.probabilities, kept), "Prediction must not alias OpenCV's outputs"
    with Runtime(standard, device="cpu") as ort_rt:   # ONNX Runtime runs the standard-ops file too
        assert ort_rt.backend == "onnxruntime"
        assert_close(ort_rt.predict(frames).probabilities, want.probabilities, rtol=1e-4, atol=1e-5,
                     what="ORT, standard-ops file")


@pytest.mark.usefixtures("one_opencv_thread")
def test_opencv_with_baked_frames_and_a_model_dir(model_dir, rt, frames, tmp_path):
    fixed = _export(model_dir, tmp_path / "cam.onnx", preprocess="uint8-nhwc", frame_size=frames.shape[1:3],
                    channel_order="bgr", standard_ops=True)
    with Runtime(fixed, backend="opencv", channel_order="bgr") as cam:
        assert cam.frame_size == (48, 40) and cam._backend.baked
        assert_close(cam.predict(frames[..., ::-1].copy()).probabilities, rt.predict(frames).probabilities,
                     rtol=1e-4, atol=1e-5, what="OpenCV, baked BGR preprocessing")
        with pytest.raises(EdgehebbError, match="takes frames of 48x40"):
            cam.predict(frames[:, :20])
    with Runtime(model_dir, backend="opencv") as on_the_fly:   # exported (uint8 frames in), then converted
        assert on_the_fly._tmp is not None and on_the_fly.frame_size is None
        assert_close(on_the_fly.predict(frames).probabilities, rt.predict(frames).probabilities,
                     rtol=1e-4, atol=1e-5, what="OpenCV from a model directory")


def test_opencv_refusals_are_one_line(onnx_file, tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    for make, message in [(lambda: Runtime(onnx_file, backend="opencv", device="cuda"), "CPU only"),
                          (lambda: Runtime(engine, backend="opencv"), "use backend='tensorrt'")]:
        with pytest.raises(EdgehebbError, match=message):
            make()
    monkeypatch.setitem(sys.modules, "cv2", None)   # as without OpenCV installed
    with pytest.raises(EdgehebbError, match="pip install opencv-python-headless") as info:
        Runtime(onnx_file, backend="opencv")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- large batches

def test_chunks_are_as_equal_as_possible():
    assert chunks(5, 64) == [(0, 5)]
    assert chunks(128, 64) == [(0, 64), (64, 128)]
    assert [b - a for a, b in chunks(129, 64)] == [43, 43, 43]
    for n in range(1, 300):
        for most in (3, 7, 64):
            sizes = [b - a for a, b in chunks(n, most)]
            assert sum(sizes) == n and max(sizes) <= most and len(sizes) == -(-n // most)
            assert max(sizes) - min(sizes) <= 1 and (n == 1 or min(sizes) >= 2), (n, most, sizes)


def _split_and_whole(model_dir, backend: str, threads: int | None):
    frames = np.random.default_rng(3).integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    with Runtime(model_dir, backend=backend, device="cpu", max_chunk=1000, threads=threads) as whole, \
            Runtime(model_dir, backend=backend, device="cpu", max_chunk=5, threads=threads) as split:
        assert whole.max_chunk == 1000 and split.max_chunk == 5
        seen = []
        prepare = split._backend.prepare
        split._backend.prepare = lambda x: seen.append(len(x)) or prepare(x)
        got, want = split.predict(frames, features=True), whole.predict(frames, features=True)
        assert sorted(seen) == [4, 4, 5, 5, 5], "23 frames in five calls of at most 5, as equal as possible"
    return got, want


@pytest.mark.parametrize("backend, threads", [("torch", None), ("onnxruntime", None), ("opencv", 1)])
def test_large_batches_are_split_with_the_same_results(model_dir, backend, threads):
    # bit for bit: these backends give a frame the same numbers in any batch of 2 or more (OpenCV with one thread)
    got, want = _split_and_whole(model_dir, backend, threads)
    assert np.array_equal(got.probabilities, want.probabilities) and np.array_equal(got.features, want.features)


def test_opencv_with_its_own_threads_splits_within_op_spec(model_dir):
    # OpenCV DNN's own thread pool divides the work by the batch it is given, so with more than one
    # thread a chunked call can differ from an unsplit one in the last bits: the Runtime promises OP_SPEC's
    # tolerance there, and bits only with threads=1 (the module doc says so)
    got, want = _split_and_whole(model_dir, "opencv", None)
    assert np.abs(got.probabilities - want.probabilities).max() <= 1e-5
    assert (got.class_ids == want.class_ids).all()
    assert np.allclose(got.features, want.features, rtol=1e-4, atol=1e-6 * np.abs(want.features).max())


def test_max_chunk_default_and_bad_values(model_dir):
    for name in ("torch", "onnxruntime", "opencv"):
        with Runtime(model_dir, backend=name, device="cpu") as runtime:
            assert runtime.max_chunk == BACKENDS[name].cpu_chunk
    assert CUDA_MAX_CHUNK == 256
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(EdgehebbError, match="max_chunk must be an integer >= 1"):
            Runtime(model_dir, device="cpu", max_chunk=bad)


@pytest.mark.parametrize("model, chunk", [("fig2_left-cifar10", {"torch": 4, "onnxruntime": 2, "opencv": 2}),
                                          ("fig2_left_wide-cifar10", {"torch": 1, "onnxruntime": 1, "opencv": 1})])
def test_the_cpu_chunk_shrinks_for_larger_cosine_maps(model, chunk, tmp_path):
    # cpu_chunk was measured on fig2_left; the wide model's maps are 4x larger, so a call gets 1 frame, not 2
    # or 4, from a model directory and from an exported file alike
    from edgehebb.deploy.backends.base import CHUNK_REFERENCE_MAP
    from edgehebb.deploy.onnx_export import export_onnx
    from edgehebb.nnl.model import resolve_model
    from edgehebb.nnl.spec import load_spec, map_floats

    assert map_floats(load_spec("fig2_left")) == CHUNK_REFERENCE_MAP == 400 * 29 * 29
    for name, want in chunk.items():
        with Runtime(model, backend=name, device="cpu") as runtime:
            assert runtime.max_chunk == want, name
    onnx = export_onnx(str(resolve_model(model)), tmp_path / "m.onnx")
    with Runtime(onnx, backend="onnxruntime", device="cpu") as runtime:
        assert runtime.max_chunk == chunk["onnxruntime"]
    with Runtime(onnx, backend="onnxruntime", device="cpu", max_chunk=8) as runtime:
        assert runtime.max_chunk == 8   # asked for: kept


_PEAK_MEMORY = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from edgehebb import Runtime

def mib(key):   # VmRSS: resident now; VmHWM: the peak since the last reset
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

frames = np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]), 32, 32, 3), dtype=np.uint8)
peaks = {}
for backend in sys.argv[3:]:
    with Runtime(sys.argv[1], backend=backend, device="cpu") as rt:
        rt.predict(frames[:1])                   # loaded and run once: the baseline
        base = mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                         # VmHWM := VmRSS (Linux >= 4.0)
        rt.predict(frames)
        peaks[backend] = mib("VmHWM") - base
print(json.dumps(peaks))
"""


def test_peak_memory_of_a_large_batch_is_bounded(tmp_path):
    """1,024 frames through a model with a large activation map per frame (64 x 32 x 32 cosines, 256 KiB:
    256 MiB for the batch): unsplit, each backend peaked at 590-710 MiB above its baseline; split into
    chunks of 64, at 46-88 MiB (2026-12-03). The bound is not a machine's figure but the model's: a
    chunked call must hold well under the unsplit batch's own activations (256 MiB), so at most 128 MiB.
    Measured in a fresh process, where peak RSS is the process's own."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS between backends")
    spec = spec_from_dict({"name": "wide", "input": [3, 32, 32], "classes": 3,
                           "blocks": [{"kernel": 1, "filters": 64, "power": 2, "pool": 2}]})
    net = NNLNet(spec, [torch.randn(64, 3, 1, 1, generator=torch.Generator().manual_seed(0))])
    model = save_model(tmp_path / "wide", net, CLASSES)
    backends = ["torch"] + [name for name, module in (("onnxruntime", "onnxruntime"), ("opencv", "cv2"))
                            if importlib.util.find_spec(module) is not None]
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(model), "1024", *backends], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(peaks) == set(backends)
    batch_activations_mib = 1024 * 64 * 32 * 32 * 4 / 2 ** 20
    assert all(mib < batch_activations_mib / 2 for mib in peaks.values()), f"peak RSS above the baseline, MiB: {peaks}"


# ----------------------------------------------------------------------------- TensorRT

def test_tensorrt_backend_without_tensorrt(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the GPU tests cover the engine")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    engine.with_name("model.engine.json").write_text(json.dumps({"classes": CLASSES, "input": [3, 32, 32]}))
    with pytest.raises(EdgehebbError, match="tensorrt is not installed.*pip install"):
        Runtime(engine)


@pytest.mark.trt
@pytest.mark.parametrize("preprocess", [None, "uint8-nhwc"])
def test_tensorrt_backend_matches_torch(onnx_file, model_dir, rt, frames, tmp_path, preprocess):
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("needs TensorRT and a CUDA GPU")
    from edgehebb.deploy.tensorrt_engine import build_engine

    src = onnx_file if preprocess is None else _export(
        model_dir, tmp_path / "baked.onnx", preprocess=preprocess, frame_size=frames.shape[1:3])
    engine = build_engine(src, tmp_path / f"{src.stem}.engine", batch=(1, 2, 4))
    with Runtime(engine, channel_order="bgr") as trt_rt:
        assert (trt_rt.backend, trt_rt.classes, trt_rt.max_batch) == ("tensorrt", CLASSES, 4)
        got = trt_rt.predict(frames[..., ::-1].copy(), features=True)   # 5 frames: two slices of the profile
        want = rt.predict(frames, features=True)
        assert_close(got.probabilities, want.probabilities, rtol=1e-3, atol=1e-4, what="TensorRT vs torch")
        assert_close(got.features, want.features, rtol=1e-3, atol=1e-5, what="TensorRT vs torch features")


# ----------------------------------------------------------------------------- packaging

def test_import_edgehebb_stays_light():
    code = ("import sys, edgehebb; heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'pycuda', 'cv2') "
            "if m in sys.modules]; assert not heavy, heavy; assert callable(edgehebb.Runtime); "
            "assert 'onnxruntime' not in sys.modules and 'tensorrt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_engine_source_metadata_from_the_sidecar_or_the_onnx_file(model_dir, tmp_path):
    from edgehebb.deploy.backends.tensorrt_backend import source_onnx_metadata
    from edgehebb.deploy.tensorrt_plan import sidecar_path

    engine = tmp_path / "m.engine"
    onnx_path = _export(model_dir, tmp_path / "m.onnx", preprocess="uint8-nhwc")
    exported = read_onnx_metadata(onnx_path)
    sidecar = sidecar_path(engine)
    sidecar.write_text(json.dumps({"onnx": {"file": "m.onnx", "metadata": exported}}))
    onnx_path.unlink()
    assert source_onnx_metadata(engine, sidecar) == exported              # no ONNX file needed
    sidecar.write_text(json.dumps({"onnx": {"file": "m.onnx"}}))           # an engine built before the copy
    assert source_onnx_metadata(engine, sidecar) is None
    _export(model_dir, onnx_path, preprocess="uint8-nhwc")
    assert source_onnx_metadata(engine, sidecar) == exported


# ----------------------------------------------------------------------------- camera frames as they come (issue 20)

def test_a_list_of_frames_of_mixed_sizes_keeps_its_order(rt, frames):
    small = np.random.default_rng(5).integers(0, 256, (2, 33, 61, 3), dtype=np.uint8)
    mixed = [frames[0], small[0], frames[1], torch.from_numpy(small[1].copy()), frames[2]]
    got = rt.predict(mixed, features=True)
    one_by_one = [rt.predict(np.asarray(f), features=True) for f in mixed]
    assert len(got) == 5 and got.names == [p.names[0] for p in one_by_one]
    want = np.concatenate([p.probabilities for p in one_by_one])
    assert_close(got.probabilities, want, rtol=1e-5, atol=1e-7, what="list vs one by one")
    assert got.features.shape == (5, rt._backend.net.head.in_features)
    # frames of one size go to the backend as one batch
    seen = []
    prepare = rt._backend.prepare
    rt._backend.prepare = lambda x: seen.append(tuple(x.shape)) or prepare(x)
    try:
        rt.predict(list(frames[:3]) + [small[0]])
    finally:
        rt._backend.prepare = prepare
    assert sorted(seen) == sorted([(3, 48, 40, 3), (1, 33, 61, 3)])


@pytest.mark.parametrize("bad, message", [([], "empty list"), ([np.zeros((48, 40), np.uint8)], r"frames\[0\]"),
                                          ([np.zeros((48, 40, 3), np.uint8), "x"], r"frames\[1\]"),
                                          ([np.zeros((1, 48, 40, 3), np.uint8)], r"frames\[0\] must be one frame")])
def test_bad_lists_name_the_frame(rt, bad, message):
    with pytest.raises(EdgehebbError, match=message):
        rt.predict(bad)


def test_frames_smaller_than_the_model_are_refused_unless_upscaled(model_dir, rt):
    tiny = np.full((2, 2, 2, 3), 200, np.uint8)
    with pytest.raises(EdgehebbError, match="2x2 frame is smaller than the model's 32x32 input.*upscale=True"):
        rt.predict(tiny)
    with pytest.raises(EdgehebbError, match="31x64"):
        rt.predict(np.zeros((31, 64, 3), np.uint8))
    with Runtime(model_dir, device="cpu", upscale=True) as up:
        assert up.predict(tiny).probabilities.shape == (2, len(CLASSES))
    # with center-crop it is the crop that must be large enough: 40 x 90 crops to 40 x 40
    with Runtime(model_dir, device="cpu", fit="center-crop") as crop:
        crop.predict(np.zeros((40, 90, 3), np.uint8))
        with pytest.raises(EdgehebbError, match=r"centred crop is 30x30"):
            crop.predict(np.zeros((30, 90, 3), np.uint8))


def test_center_crop_runs_the_centred_region(model_dir, frames):
    wide = np.random.default_rng(7).integers(0, 256, (3, 40, 72, 3), dtype=np.uint8)
    with Runtime(model_dir, device="cpu", fit="center-crop") as crop, Runtime(model_dir, device="cpu") as plain:
        # the centred 40 x 40 region, given alone, is what center-crop sees
        assert_close(crop.predict(wide).probabilities, plain.predict(wide[:, :, 16:56].copy()).probabilities,
                     rtol=0, atol=0, what="center-crop vs the cut region")
        assert not np.allclose(crop.predict(wide).probabilities, plain.predict(wide).probabilities)


def test_a_fit_other_than_the_baked_one_is_refused(model_dir, tmp_path):
    path = _export(model_dir, tmp_path / "crop.onnx", preprocess="uint8-nhwc", fit="center-crop")
    with pytest.raises(EdgehebbError, match="fit='center-crop' baked in"):
        Runtime(path, device="cpu", fit="resize")
    with Runtime(path, device="cpu", fit="center-crop") as baked:
        assert baked.predict(np.zeros((40, 72, 3), np.uint8)).probabilities.shape == (1, len(CLASSES))


# ----------------------------------------------------------------------------- which backend, and threads

def test_auto_runs_a_model_directory_on_the_fastest_installed_cpu_backend(model_dir, monkeypatch):
    with Runtime(model_dir, device="cpu") as auto:
        assert auto.backend == CPU_SPEED_ORDER[0] == "onnxruntime"
        assert "fastest installed CPU backend" in repr(auto) and "backend='onnxruntime'" in repr(auto)
        assert auto.why in repr(auto)
    # the next one in the order when the fastest cannot run here
    from edgehebb.deploy.backends import OrtBackend

    monkeypatch.setattr(OrtBackend, "unavailable", classmethod(lambda cls, device: "pretend it is missing"))
    with Runtime(model_dir, device="cpu") as auto:
        assert auto.backend == CPU_SPEED_ORDER[1]
    with Runtime(model_dir, backend="opencv") as asked:
        assert asked.why == "asked for" and asked.device == "cpu"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "opencv"])
def test_threads_hold_for_a_call_and_are_given_back(model_dir, frames, backend):
    import cv2

    before = torch.get_num_threads(), cv2.getNumThreads()
    with Runtime(model_dir, backend=backend, device="cpu", threads=1) as one:
        seen = []
        forward = one._backend.forward
        one._backend.forward = lambda x: seen.append((torch.get_num_threads(), cv2.getNumThreads())) or forward(x)
        one.predict(frames)
        assert "threads=1" in repr(one)
        if backend == "onnxruntime":
            assert one._backend.session.get_session_options().intra_op_num_threads == 1
    if backend == "torch":
        assert seen[0][0] == 1
    if backend == "opencv":
        assert seen[0][1] == 1
    assert (torch.get_num_threads(), cv2.getNumThreads()) == before
    with pytest.raises(EdgehebbError, match="threads must be an integer >= 1"):
        Runtime(model_dir, device="cpu", threads=0)
