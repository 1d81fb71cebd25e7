"""A hidden layer in the head (issue 24): spec ``head_hidden`` = H makes the head Linear(D, H) -> ReLU ->
Linear(H, classes). It is part of the model: the spec, the model format (version 2), the feature cache
(shared with the linear head), training with dropout, the CLI, and every backend: torch in float64 is
the reference, ONNX (both forms) in ONNX Runtime and onnx's reference evaluator within OP_SPEC's 1e-4 of
a row's largest logit, and Runtime's torch, ONNX Runtime and OpenCV backends within 1e-5 in probability."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgehebb.cli import cli
from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from edgehebb.errors import EdgehebbError
from edgehebb.nnl import HiddenHead, NNLNet, load_model, save_model, spec_from_dict, with_options
from edgehebb.nnl.features import features_key
from edgehebb.nnl.spec import head_macs
from edgehebb.nnl.train import fit_standardiser, train_head
from tests.test_train import FAST, SPEC, _gratings, _npz, bank_dir  # noqa: F401 (bank_dir: a fixture)

HIDDEN = {**SPEC, "head_hidden": 8}


def _net(spec: dict, seed: int = 0) -> NNLNet:
    g = torch.Generator().manual_seed(seed)
    net = NNLNet(spec_from_dict(spec), [torch.randn(12, 3, 4, 4, generator=g)])
    with torch.no_grad():
        fit_standardiser(net, net.features(torch.rand(16, 3, 16, 16, generator=g)).numpy())
        for p in net.head.parameters():
            p.normal_(0, 0.5, generator=g)
    return net.eval()


def test_the_spec_key_defaults_to_the_linear_head_and_is_checked():
    linear, hidden = spec_from_dict(SPEC), spec_from_dict(HIDDEN)
    assert linear.head_hidden == 0 and "head_hidden" not in linear.to_dict(), "a linear spec reads as before"
    assert hidden.head_hidden == 8 and spec_from_dict(hidden.to_dict()) == hidden
    assert with_options(linear, head_hidden=8) == dataclasses.replace(hidden, name=linear.name)
    assert with_options(hidden, head_hidden=0).head_hidden == 0
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(EdgehebbError, match="tiny.json: 'head_hidden' must be an integer >= 0"):
            spec_from_dict({**SPEC, "head_hidden": bad}, "tiny.json")
    d = 12 * 3 * 3
    assert head_macs(linear) == d * 3 and head_macs(hidden) == d * 8 + 8 * 3


def test_the_hidden_head_is_relu_between_two_linear_layers():
    net = _net(HIDDEN)
    assert isinstance(net.head, HiddenHead) and isinstance(_net(SPEC).head, torch.nn.Linear)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f = net.features(x)
        z = (f - net.feature_mean) * net.feature_scale
        want = torch.relu(z @ net.head.hidden.weight.T + net.head.hidden.bias) @ net.head.out.weight.T + net.head.out.bias
        assert torch.allclose(net(x), want, atol=1e-6)
    net.head.dropout = 0.9
    with torch.no_grad():
        assert torch.equal(net(x), net(x)), "dropout acts only in training"


def test_models_with_a_hidden_layer_are_format_2_and_linear_ones_stay_1(tmp_path):
    for spec, version in ((SPEC, "1"), (HIDDEN, "2")):
        net = _net(spec)
        save_model(tmp_path / version, net, ["a", "b", "c"])
        config = json.loads((tmp_path / version / "config.json").read_text())
        assert config["format"] == f"edgehebb.model/{version}"
        loaded, _ = load_model(tmp_path / version)
        x = torch.rand(3, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))
    config = json.loads((tmp_path / "2" / "config.json").read_text())
    (tmp_path / "2" / "config.json").write_text(json.dumps({**config, "format": "edgehebb.model/1"}))
    with pytest.raises(EdgehebbError, match="format 'edgehebb.model/1' does not match its spec"):
        load_model(tmp_path / "2")


def test_heads_share_the_feature_cache():
    images = _gratings(6, 0).x
    assert features_key(_net(SPEC), images) == features_key(_net(HIDDEN), images)


def test_a_hidden_layer_learns_what_a_linear_head_cannot():
    # class = XOR of the signs of two features (the rest constant): no linear head beats chance (~50 %)
    rng = np.random.default_rng(0)
    feats = np.zeros((400, 108), np.float32)
    feats[:, :2] = rng.normal(size=(400, 2))
    labels = ((feats[:, 0] > 0) ^ (feats[:, 1] > 0)).astype(np.int64)
    two = {**SPEC, "classes": 2}
    cfg = dataclasses.replace(FAST, epochs=40, lr=1e-2, val_fraction=0.25)
    linear = train_head(_net(two), feats, labels, cfg, progress=False, log=lambda line: None)
    net = _net({**two, "head_hidden": 32})
    hidden = train_head(net, feats, labels, cfg, progress=False, log=lambda line: None)
    assert linear["val_accuracy"] < 0.7 < 0.85 < hidden["val_accuracy"], (linear["val_accuracy"], hidden["val_accuracy"])
    a = train_head(_net({**two, "head_hidden": 32}), feats, labels, dataclasses.replace(cfg, dropout=0.3, epochs=3),
                   progress=False, log=lambda line: None)
    b = train_head(_net({**two, "head_hidden": 32}), feats, labels, dataclasses.replace(cfg, dropout=0.3, epochs=3),
                   progress=False, log=lambda line: None)
    c = train_head(_net({**two, "head_hidden": 32}), feats, labels, dataclasses.replace(cfg, epochs=3),
                   progress=False, log=lambda line: None)
    losses = [[r["train_loss"] for r in run["history"]] for run in (a, b, c)]
    assert losses[0] == losses[1] != losses[2], "dropout on the hidden layer is seeded and changes the training"


def test_a_hidden_head_runs_the_same_on_every_backend(tmp_path, one_opencv_thread):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from edgehebb import Runtime
    from edgehebb.deploy.onnx_export import export_onnx

    net = _net(HIDDEN, seed=1)
    save_model(tmp_path / "m", net, ["a", "b", "c"])
    frames = (np.random.default_rng(1).random((7, 16, 16, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ref = net.double()(x.double())
    for standard in (False, True):
        path = export_onnx(str(tmp_path / "m"), tmp_path / f"m-{standard}.onnx", standard_ops=standard)
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert ops[-4:] == ["Gemm", "Relu", "Gemm", "Softmax"], ops
        got = ReferenceEvaluator(model).run(["logits"], {"images": x.numpy()})[0]
        assert parity_error(got, ref).max() <= PARITY_TOLERANCE, ("reference evaluator", standard)
    with Runtime(tmp_path / "m", backend="torch") as t, Runtime(tmp_path / "m", backend="onnxruntime") as o, \
            Runtime(tmp_path / "m", backend="opencv") as c:
        want = t.predict(frames).probabilities
        assert np.abs(want - ref.softmax(1).numpy()).max() < 1e-5
        for other in (o, c):
            assert np.abs(other.predict(frames).probabilities - want).max() < 1e-5, other.backend


def test_cli_trains_a_hidden_head(bank_dir, tmp_path):
    (tmp_path / "d").mkdir()
    _npz(tmp_path / "d" / "train.npz", _gratings(60, 0))
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(SPEC))
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec), "--data", str(tmp_path / "d"), "--epochs", "2",
                                   "--device", "cpu", "--val-fraction", "0.2", "--no-cache", "--head-hidden", "16",
                                   "--dropout", "0.25", "--out", str(tmp_path / "m"), "--filters-from", str(bank_dir)])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["spec"]["head_hidden"] == 16 and config["format"] == "edgehebb.model/2"
    net, _ = load_model(tmp_path / "m")
    assert net.head.hidden.weight.shape == (16, 12 * 3 * 3)
    bad = CliRunner().invoke(cli, ["train", "--spec", str(spec), "--out", str(tmp_path / "x"), "--head-hidden", "-1"])
    assert bad.exit_code == 2 and "--head-hidden" in bad.output
