"""Every shipped model works by name on the command line (issue 24): `export`, `eval` and `bench` (which
runs edgehebb.Runtime's CPU backends), on a small image-folder tree of the model's classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgehebb.cli import cli
from edgehebb.nnl.model import load_model, shipped_models


@pytest.fixture
def cifar_like_tree(tmp_path, monkeypatch):
    """test/<class>/*.png: two random 32 x 32 images for each of the shipped models' ten classes."""
    from PIL import Image

    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))   # not ~/.cache/edgehebb
    _, config = load_model(shipped_models()[0])
    rng = np.random.default_rng(0)
    for cls in config["classes"]:
        d = tmp_path / "data" / "test" / cls
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "data"


@pytest.mark.parametrize("model", shipped_models())
def test_every_shipped_model_works_by_name(model, cifar_like_tree, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["export", model, "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0 and (tmp_path / "m.onnx").is_file(), res.output
    res = runner.invoke(cli, ["eval", model, "--data", str(cifar_like_tree), "--no-sweep", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["clean"]["images"] == 20
    res = runner.invoke(cli, ["bench", model, "--data", str(cifar_like_tree), "--backends", "torch,onnxruntime",
                              "--batch", "1", "--warmup", "0", "--iters", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    backends = json.loads(res.stdout)["backends"]
    assert {name: b["status"] for name, b in backends.items()} == {"torch": "ok", "onnxruntime": "ok"}, backends
    # both backends run the same network: the same predictions on the same 20 images
    assert backends["torch"]["clean"]["per_class"] == backends["onnxruntime"]["clean"]["per_class"]
