"""edgehebb bench: accuracy on clean and shadowed images and latency per backend, as JSON and a PNG."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgehebb.deploy.backends import BACKENDS as BACKEND_CLASSES
from edgehebb.deploy.bench import BACKENDS, camera_frames, run_bench, summarise, why_skipped
from edgehebb.cli.bench import BACKEND_NAMES, bench
from edgehebb.data import load_split
from edgehebb.errors import EdgehebbError
from edgehebb.evaluate.accuracy import evaluate
from edgehebb.nnl.model import load_model
from tests.test_runtime import tiny_model


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model(tmp_path / "tiny16", size=16)


def test_bench_reports_every_backend(model_dir, image_tree):
    test = load_split(image_tree, "test", progress=False)
    lines = []
    result = run_bench(model_dir, test, batches=[1, 4], warmup=1, iters=3, log=lines.append)
    assert set(result) >= {"model", "data", "shadow", "settings", "timing", "machine", "backends"}
    assert result["shadow"] == {"intensity": 0.3, "coverage": 0.8, "seed": 0}
    assert list(result["backends"]) == list(BACKENDS) and len(lines) == len(BACKENDS)
    for name, entry in result["backends"].items():
        # every CPU backend is installed here (torch, onnxruntime and opencv are test dependencies) and must
        # run; a GPU backend is skipped exactly when it cannot run here, with why
        reason = why_skipped(name, "model")
        assert (BACKENDS[name][1] == "cpu") <= (reason is None), (name, reason)
        assert entry["status"] == ("skipped" if reason else "ok"), name
        if entry["status"] == "skipped":
            assert entry == {"status": "skipped", "reason": reason}, name
            continue
        assert {"clean", "shadowed", "latency", "device"} <= set(entry)
        assert [r["batch"] for r in entry["latency"]] == [1, 4]
        for r in entry["latency"]:
            for way in ("host", "device"):
                t = r[way]
                assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"], (name, way)
                assert t["images_per_s"] == pytest.approx(r["batch"] / t["p50_ms"] * 1e3)
    json.dumps(result)   # JSON-ready

    ok = result["backends"]["torch"]
    assert ok["status"] == "ok" and ok["device"] == "cpu"
    # the same numbers as `edgehebb eval` (same shadows, same model; 16x16 images need no resize)
    net, config = load_model(model_dir)
    ref = evaluate(net, test, config["classes"], sweep=None, progress=False)
    for split in ("clean", "shadowed"):
        assert ok[split]["accuracy"] == pytest.approx(ref[split]["accuracy"]), split
        assert ok[split]["per_class"] == pytest.approx(ref[split]["per_class"]), split


def test_backends_that_cannot_run_are_skipped_with_a_reason(monkeypatch):
    assert "model directory" in why_skipped("torch", "onnx")
    assert ".engine" in why_skipped("tensorrt", "model")
    assert "TensorRT engine" in why_skipped("onnxruntime", "engine")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "no CUDA GPU" in why_skipped("torch-cuda", "model")
    assert why_skipped("torch", "model") is None


def test_gpu_backend_that_cannot_start_is_skipped_with_its_reason(model_dir, image_tree, ort_cuda_unusable):
    test = load_split(image_tree, "test", progress=False)
    result = run_bench(model_dir, test, backends=["torch", "onnxruntime-cuda"], batches=[1], warmup=0, iters=1)
    assert result["backends"]["torch"]["status"] == "ok"
    skipped = result["backends"]["onnxruntime-cuda"]
    assert skipped["status"] == "skipped" and "could not start its CUDAExecutionProvider" in skipped["reason"]


def test_summarise():
    s = summarise([4.0, 1.0, 3.0, 2.0, 100.0], batch=10)
    assert (s["p50_ms"], s["min_ms"], s["mean_ms"]) == (3.0, 1.0, 22.0)
    assert s["p90_ms"] == pytest.approx(61.6) and s["images_per_s"] == pytest.approx(10 / 3e-3)


def test_bad_settings_are_errors(model_dir, image_tree):
    test = load_split(image_tree, "test", progress=False)
    with pytest.raises(EdgehebbError, match="unknown backend"):
        run_bench(model_dir, test, backends=["torch", "tflite"])
    with pytest.raises(EdgehebbError, match="batches must be"):
        run_bench(model_dir, test, batches=[0])
    with pytest.raises(EdgehebbError, match="warmup must be >= 0, got -1"):
        run_bench(model_dir, test, warmup=-1)


def test_cli_writes_json_and_png(model_dir, image_tree, tmp_path):
    png = tmp_path / "bench.png"
    args = [str(model_dir), "--data", str(image_tree), "--backends", "torch,tensorrt,torch-cuda", "--batch", "1,3",
            "--warmup", "0", "--iters", "2", "--limit", "6", "--png", str(png), "--json"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.stdout)
    assert list(report["backends"]) == ["torch", "tensorrt", "torch-cuda"]
    assert report["backends"]["torch"]["clean"]["images"] == 6
    assert report["backends"]["tensorrt"]["status"] == "skipped"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch: clean" in result.stderr and "tensorrt: skipped" in result.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--batch", "1,0", "batch sizes >= 1"), ("--batch", "a", "batch sizes"),
    ("--backends", "torch,tflite", "unknown backend"),
])
def test_cli_bad_options(model_dir, image_tree, option, value, message):
    result = CliRunner().invoke(bench, [str(model_dir), "--data", str(image_tree), option, value])
    assert result.exit_code == 2 and message in result.output


def test_cli_backend_names_match_the_library():
    assert BACKEND_NAMES == tuple(BACKENDS)


def test_cli_module_loads_only_click():
    import subprocess
    import sys

    code = ("import sys, edgehebb.cli.bench; heavy = [m for m in ('torch', 'numpy', 'onnxruntime') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_file_runs_on_onnxruntime_only(model_dir, image_tree, tmp_path):
    from edgehebb.deploy.onnx_export import export_onnx   # a dependency of the package: no skip

    onnx_file = export_onnx(str(model_dir), tmp_path / "tiny.onnx")
    test = load_split(image_tree, "test", progress=False)
    result = run_bench(onnx_file, test, backends=["torch", "onnxruntime"], batches=[2], warmup=0, iters=2)
    assert result["backends"]["torch"]["status"] == "skipped"
    ort = result["backends"]["onnxruntime"]
    assert ort["status"] == "ok" and ort["providers"] == ["CPUExecutionProvider"]
    ref = run_bench(model_dir, test, backends=["torch"], batches=[2], warmup=0, iters=2)["backends"]["torch"]
    assert np.isclose(ort["clean"]["accuracy"], ref["clean"]["accuracy"])
    assert np.isclose(ort["shadowed"]["accuracy"], ref["shadowed"]["accuracy"])


def test_cli_checks_the_model_before_loading_data(tmp_path):
    result = CliRunner().invoke(bench, [str(tmp_path / "missing-model"), "--data", str(tmp_path / "no-data")])
    assert isinstance(result.exception, EdgehebbError) and "missing-model" in str(result.exception)


def test_cli_refuses_a_corrupt_model_or_onnx_file_before_loading_data(model_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)   # flip the last tensor bytes: the stored checksum no longer matches
    weights.write_bytes(bytes(raw))
    result = CliRunner().invoke(bench, [str(model_dir), "--data", str(tmp_path / "no-data")])
    assert isinstance(result.exception, EdgehebbError) and "model.safetensors" in str(result.exception)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    result = CliRunner().invoke(bench, [str(junk), "--data", str(tmp_path / "no-data")])
    assert isinstance(result.exception, EdgehebbError) and "junk.onnx" in str(result.exception)


def test_cli_checks_the_png_path_before_loading_data(model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    png = tmp_path / "file" / "bench.png"
    result = CliRunner().invoke(bench, [str(model_dir), "--data", str(tmp_path / "no-data"), "--png", str(png)])
    assert isinstance(result.exception, EdgehebbError) and f"cannot write {png}" in str(result.exception)


# ----------------------------------------------------------------------------- OpenCV and camera-sized frames

def test_standard_ops_file_runs_on_onnxruntime_and_opencv(model_dir, image_tree, tmp_path):
    from edgehebb.deploy.onnx_export import export_onnx

    onnx_file = export_onnx(str(model_dir), tmp_path / "std.onnx", standard_ops=True)
    test = load_split(image_tree, "test", progress=False)
    result = run_bench(onnx_file, test, backends=["onnxruntime", "opencv"], batches=[2], warmup=0, iters=2)
    ref = run_bench(model_dir, test, backends=["torch"], batches=[2], warmup=0, iters=2)["backends"]["torch"]
    for name in ("onnxruntime", "opencv"):
        entry = result["backends"][name]
        assert entry["status"] == "ok" and entry["device"] == "cpu", name
        assert entry["max_chunk"] == BACKEND_CLASSES[name].cpu_chunk, name
        assert entry["frames"] == {"size": [16, 16], "resized": False}
        for split in ("clean", "shadowed"):
            assert entry[split]["accuracy"] == pytest.approx(ref[split]["accuracy"]), (name, split)


def test_a_fixed_frame_size_export_gets_the_test_images_resized(model_dir, image_tree, tmp_path):
    from edgehebb.deploy.onnx_export import export_onnx
    from edgehebb.deploy.runtime import Runtime

    backends = ["onnxruntime", "opencv"]   # opencv-python-headless is a test dependency
    onnx_file = export_onnx(str(model_dir), tmp_path / "cam.onnx", preprocess="uint8-nhwc", frame_size=(48, 64))
    test = load_split(image_tree, "test", progress=False)
    lines = []
    result = run_bench(onnx_file, test, backends=backends, batches=[1, 3], warmup=0, iters=2, log=lines.append)
    frames = camera_frames(test.x, (48, 64))
    with Runtime(onnx_file, device="cpu") as rt:   # what a camera sending 48x64 frames would get
        want = rt.predict(frames).class_ids
    for name, line in zip(backends, lines):
        entry = result["backends"][name]
        assert entry["status"] == "ok" and entry["frames"] == {"size": [48, 64], "resized": True}, name
        assert [r["batch"] for r in entry["latency"]] == [1, 3]
        assert entry["clean"]["accuracy"] == pytest.approx(float(np.mean(want == test.y))), name
        assert "fed 48x64 frames (the test images resized" in line, line


def test_camera_frames_resize_like_the_models_own_preprocessing(image_tree):
    import torch

    from edgehebb.deploy.frames import frames_to_tensor

    images = np.tile(load_split(image_tree, "test", progress=False).x, (2, 1, 1, 1))   # 48: two resize batches
    assert camera_frames(images, None) is images and camera_frames(images, (16, 16)) is images
    frames = camera_frames(images, (48, 64))
    assert frames.shape == (48, 48, 64, 3) and frames.dtype == np.uint8
    want = frames_to_tensor(images, (48, 64))
    assert torch.equal(torch.from_numpy(frames).permute(0, 3, 1, 2), (want * 255).round().to(torch.uint8))


def test_opencv_is_skipped_with_a_reason(monkeypatch):
    assert "TensorRT engine" in why_skipped("opencv", "engine")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    assert "pip install opencv-python-headless" in why_skipped("opencv", "onnx")


def test_cli_shows_progress_bounds_its_timing_and_draws_nothing_unasked(model_dir, image_tree, tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    runner = CliRunner()
    args = [str(model_dir), "--data", str(image_tree), "--backends", "torch", "--batch", "1,2", "--warmup", "0",
            "--iters", "100000", "--seconds", "0.05", "--limit", "6", "--json"]
    result = runner.invoke(bench, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["settings"]["seconds"] == 0.05
    for row in out["backends"]["torch"]["latency"]:   # stopped by the time bound, not by --iters
        assert 3 <= len(row) and row["host"]["p50_ms"] > 0
    assert "torch (cpu): accuracy on 6 clean" in result.stderr and "batch 2: p50" in result.stderr
    assert list(here.iterdir()) == [], "no picture in the current folder without --png"
