"""The head's training options of issue 24: mirrored training images (--flip) and dropout on the features."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import edgehebb.nnl.train as train_module
from edgehebb.cli import cli
from edgehebb.errors import EdgehebbError
from edgehebb.nnl import NNLNet, spec_from_dict
from edgehebb.nnl.train import train_head, train_to_dir, validation_split
from tests.test_train import FAST, SPEC, _gratings, _npz, bank_dir  # noqa: F401 (bank_dir: a fixture)

QUIET = {"device": "cpu", "progress": False, "log": lambda line: None, "cache": ""}


def test_flip_trains_the_head_on_the_mirrored_training_images_too(bank_dir, tmp_path, monkeypatch):
    data = _gratings(120, 0)
    seen = []
    real = train_module.cached_features
    monkeypatch.setattr(train_module, "cached_features",
                        lambda net, x, **kw: seen.append(np.array(x)) or real(net, x, **kw))
    record = train_to_dir(spec_from_dict(SPEC), data, tmp_path / "m", training=dataclasses.replace(FAST, flip=True),
                          filters_from=[bank_dir], **QUIET)
    assert len(seen) == 2 and np.array_equal(seen[1], seen[0][:, :, ::-1]), "the second pass sees the mirror images"
    _, val = validation_split(data.y, FAST.val_fraction, FAST.seed)
    assert record["training"]["val_images"] == len(val), "validation stays the unmirrored images"
    assert record["training"]["train_images"] == 2 * (len(data) - len(val))
    assert record["fit"]["flip"] is True and record["fit"]["dropout"] == 0.0


def _head(feats, labels, **options):
    net = NNLNet(spec_from_dict(SPEC), [torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(1))])
    cfg = dataclasses.replace(FAST, epochs=5, **options)
    result = train_head(net, feats, labels, cfg, progress=False, log=lambda line: None)
    return net.head.weight.detach().clone(), result


def test_dropout_is_seeded_and_changes_only_the_training():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    feats = (rng.normal(size=(120, 12 * 9)) + labels[:, None] * 1.5).astype(np.float32)
    plain, _ = _head(feats, labels)
    a, result = _head(feats, labels, dropout=0.5)
    b, _ = _head(feats, labels, dropout=0.5)
    assert torch.equal(a, b), "seeded: the same dropout masks in two runs"
    assert not torch.allclose(a, plain)
    assert result["val_accuracy"] > 0.8   # the classes are separable; dropout must not break learning
    with pytest.raises(EdgehebbError, match="dropout must be in"):
        _head(feats, labels, dropout=1.0)


def test_flipped_features_join_only_the_training_rows():
    labels = np.repeat(np.arange(3), 40)
    feats = np.zeros((120, 12 * 9), np.float32)
    feats[np.arange(120), labels] = 1.0                    # the unmirrored images: class = hot feature
    mirrored = np.zeros_like(feats)
    mirrored[np.arange(120), 3 + labels] = 1.0             # mirrored: another hot feature per class
    net = NNLNet(spec_from_dict(SPEC), [torch.randn(12, 3, 4, 4)])
    out = train_head(net, feats, labels, dataclasses.replace(FAST, epochs=30, lr=5e-2), flipped=mirrored,
                     progress=False, log=lambda line: None)
    _, val = validation_split(labels, FAST.val_fraction, FAST.seed)
    assert out["train_images"] == 2 * (120 - len(val)) and out["val_images"] == len(val)
    z = torch.from_numpy((mirrored - net.feature_mean.numpy()) * net.feature_scale.numpy())
    assert (net.head(z).argmax(1).numpy() == labels).mean() > 0.9, "the head learned the mirrored rows as well"


def test_cli_records_flip_and_dropout_and_the_twin_trains_with_them(bank_dir, tmp_path):
    data = _gratings(60, 0)
    (tmp_path / "d").mkdir()
    _npz(tmp_path / "d" / "train.npz", data)
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(SPEC))
    common = ["train", "--spec", str(spec), "--data", str(tmp_path / "d"), "--epochs", "2", "--device", "cpu",
              "--val-fraction", "0.2", "--flip", "--dropout", "0.25", "--no-cache"]
    res = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "m"), "--filters-from", str(bank_dir)])
    assert res.exit_code == 0, res.output
    fit = json.loads((tmp_path / "m" / "config.json").read_text())["fit"]
    assert fit["flip"] is True and fit["dropout"] == 0.25
    twin = [a for a in common if a != "--no-cache"]
    res = CliRunner().invoke(cli, [*twin, "--out", str(tmp_path / "t"), "--baseline"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t" / "config.json").read_text())["fit"]["flip"] is True
    bad = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "x"), "--dropout", "1"])
    assert bad.exit_code == 2 and "--dropout" in bad.output


def test_cosine_schedule_anneals_the_learning_rate_to_zero(monkeypatch):
    seen = []
    real = torch.optim.lr_scheduler.CosineAnnealingLR
    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR",
                        lambda opt, steps: seen.append((opt, steps)) or real(opt, steps))
    labels = np.repeat(np.arange(3), 40)
    feats = (np.random.default_rng(0).normal(size=(120, 12 * 9)) + labels[:, None]).astype(np.float32)
    _head(feats, labels, schedule="cosine")
    opt, steps = seen[0]
    _, val = validation_split(labels, FAST.val_fraction, FAST.seed)
    assert steps == 5 * -(-(120 - len(val)) // FAST.batch)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), "annealed to 0 by the last step"
    with pytest.raises(EdgehebbError, match="unknown learning-rate schedule"):
        _head(feats, labels, schedule="step")
