"""tools/camera_demo.py: annotate a (synthetic) video with a Runtime's predictions."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_runtime import tiny_model

TOOL = Path(__file__).resolve().parent.parent / "tools" / "camera_demo.py"


def load_tool():
    """tools/camera_demo.py as a module (it puts the clone on sys.path when it is not there: put it back)."""
    spec = importlib.util.spec_from_file_location("camera_demo", TOOL)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    spec.loader.exec_module(module)
    sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def cv2():
    import cv2   # the test extra's opencv-python-headless: without it these tests fail, they do not skip

    return cv2


def count_frames(cv2, path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.fixture
def video(cv2, tmp_path) -> Path:
    """12 frames of 64x48 (W x H) moving colour blocks, MJPG in .avi (readable by every OpenCV build)."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(12):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, : 5 * i + 4] = (40 * (i % 6), 255 - 20 * i, 128)
        writer.write(frame)
    writer.release()
    assert count_frames(cv2, path) == 12
    return path


def read_frames(cv2, path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    return frames


@pytest.mark.parametrize("suffix,backend", [(".avi", "auto"), (".mp4", "auto"), (".avi", "opencv")])
def test_demo_writes_every_frame(cv2, video, tmp_path, capsys, monkeypatch, suffix, backend):
    from edgehebb.deploy.runtime import Runtime

    model = tiny_model(tmp_path / "tiny")
    out = tmp_path / f"annotated{suffix}"
    drawn = []   # every text the demo draws, in order (OpenCV's own putText still draws it)
    put_text = cv2.putText
    monkeypatch.setattr(cv2, "putText", lambda img, text, *a, **k: (drawn.append(text), put_text(img, text, *a, **k))[1])
    rc = load_tool().main(["--source", str(video), "--out", str(out), "--model", str(model), "--device", "cpu",
                           "--backend", backend])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 12 and summary["model_ms_p50"] > 0
    # two lines a frame: the class and probability the model gives that frame (BGR, as OpenCV decodes it),
    # then both frame rates with the backend that ran
    with Runtime(model, summary["backend"], "cpu", channel_order="bgr") as rt:
        preds = [rt.predict(frame) for frame in read_frames(cv2, video)]
    assert drawn[0::2] == [f"{p.names[0]} {p.probabilities[0].max():.0%}" for p in preds]
    assert len({text.split()[0] for text in drawn[0::2]}) > 1, "the clip should show more than one class"
    rates = rf"\d+ FPS model, \d+ FPS loop \({summary['backend']} cpu\)"
    assert len(drawn) == 24 and all(re.fullmatch(rates, text) for text in drawn[1::2]), drawn[1::2]
    from edgehebb.deploy.backends import CPU_SPEED_ORDER

    assert summary["backend"] == ("opencv" if backend == "opencv" else CPU_SPEED_ORDER[0])   # auto: the fastest
    assert count_frames(cv2, out) == 12
    cap = cv2.VideoCapture(str(out))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (48, 64, 3)
    assert frame[2:10, 2:40].max() > 150, "the text band in the top-left corner should be there"


def test_max_frames_and_bad_source(cv2, video, tmp_path, capsys):
    tool = load_tool()
    model = str(tiny_model(tmp_path / "tiny"))
    out = tmp_path / "five.avi"
    assert tool.main(["--source", str(video), "--out", str(out), "--model", model, "--max-frames", "5",
                      "--device", "cpu"]) == 0
    assert count_frames(cv2, out) == 5
    capsys.readouterr()
    assert tool.main(["--source", str(tmp_path / "nope.mp4"), "--out", str(out), "--model", model]) == 1
    assert "neither a file nor a webcam index" in capsys.readouterr().err
    assert tool.main(["--source", str(video), "--out", str(tmp_path / "x.gif"), "--model", model,
                      "--device", "cpu"]) == 1
    assert "unknown video type" in capsys.readouterr().err


def test_missing_opencv_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)   # makes `import cv2` raise ImportError
    rc = load_tool().main(["--source", "0", "--out", str(tmp_path / "o.avi"), "--model", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "opencv-python-headless" in err and len(err.strip().splitlines()) == 1
    assert "pip install -e '.[demo]'" in err


def test_readme_says_how_to_install_the_demo():
    import tomllib

    root = TOOL.parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("opencv") for dep in extras["demo"])
    readme = (root / "README.md").read_text()
    assert "pip install -e '.[demo]'" in readme and "camera_demo.py" in readme


def test_help_runs():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True)
    assert "--source" in result.stdout and "--max-frames" in result.stdout
