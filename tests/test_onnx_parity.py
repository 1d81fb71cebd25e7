"""tools/onnx_parity.py's rule for clients: each one asked for (--clients, default all) must be installed.

A missing client stops the tool before any work with one line saying what to install or how to leave
it out; it never turns into a "skipped" row of the table. (The real-data run of the tool is in
tests/test_real_data.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgehebb.deploy.op import PARITY_TOLERANCE
from edgehebb.errors import EdgehebbError

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def onnx_parity(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import onnx_parity

    return onnx_parity


def test_a_missing_client_is_an_error_before_any_work(onnx_parity, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cv2", None)   # as without OpenCV installed
    monkeypatch.setattr(onnx_parity, "load_model", lambda *a, **k: pytest.fail("worked before checking the clients"))
    with pytest.raises(EdgehebbError) as e:
        onnx_parity.main(["--data", str(tmp_path / "no-data")])
    message = str(e.value)
    assert "opencv-python-headless>=5.0 is not installed" in message and "\n" not in message
    assert "--clients onnxruntime,onnx-reference" in message
    with pytest.raises(EdgehebbError, match="--clients 'tensorrt': choose from onnxruntime, opencv-dnn, onnx-reference"):
        onnx_parity.main(["--clients", "tensorrt"])


def test_clients_left_out_are_not_needed(onnx_parity, monkeypatch, tmp_path):
    """With --clients onnxruntime the tool runs without OpenCV: both export forms, within OP_SPEC."""
    monkeypatch.setitem(sys.modules, "cv2", None)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "test.npz", x=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y=np.arange(10))
    rows = onnx_parity.main(["--data", str(data), "--limit", "10", "--clients", "onnxruntime"])
    assert [(r["client"], r["file"], r["images"]) for r in rows] == [("onnxruntime", "default", 10),
                                                                     ("onnxruntime", "standard-ops", 10)]
    assert all(r["max_rel_of_row_max"] <= PARITY_TOLERANCE and r["top1_agreement"] == 1.0 for r in rows), rows
