"""Classifier training and evaluation: validation split, standardiser, head and end-to-end training,
model directories, ``edgehebb train`` / ``edgehebb eval`` (happy and bad-input paths), real-data smoke."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgehebb.cli import cli
from edgehebb.data import ImageSet, load_split
from edgehebb.errors import EdgehebbError
from edgehebb.nnl import features
from edgehebb.evaluate.accuracy import evaluate, predict
from edgehebb.io import save_filters
from edgehebb.nnl.model import load_model, save_model
from edgehebb.nnl import ConvNet, NNLNet, spec_from_dict
from edgehebb.nnl.train import TrainConfig, fit_standardiser, train_to_dir, training_images, validation_split

from .conftest import assert_close

SPEC = {"name": "tiny", "input": [3, 16, 16], "classes": 3,
        "blocks": [{"kernel": 4, "filters": 12, "power": 10, "pool": 5, "pool_stride": 4}]}
FAST = TrainConfig(epochs=15, batch=32, lr=1e-2, val_fraction=0.2)


def _gratings(n: int, seed: int) -> ImageSet:
    """3 classes: horizontal, vertical and diagonal gratings, random phase, colour and brightness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    angles = (0.0, np.pi / 2, np.pi / 4)
    x, y = [], []
    for i in range(n):
        c = i % 3
        a = angles[c]
        wave = np.sin(1.2 * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 6.3))
        img = rng.uniform(60, 190) + 50 * wave[..., None] * rng.uniform(0.3, 1, 3) + rng.normal(0, 12, (16, 16, 3))
        x.append(np.clip(img, 0, 255).astype(np.uint8))
        y.append(c)
    return ImageSet(np.stack(x), np.array(y, np.int64), ["h", "v", "d"], f"gratings seed {seed}")


@pytest.fixture
def bank_dir(tmp_path):
    """A K=12, W=4 'learned' bank: oriented edge filters plus noise (learning itself is tested elsewhere)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    banks = []
    for k in range(12):
        a = k * np.pi / 12
        edge = torch.sin(1.2 * (np.cos(a) * xx + np.sin(a) * yy) + k)
        banks.append(edge[None].repeat(3, 1, 1) + 0.1 * torch.randn(3, 4, 4, generator=g))
    out = tmp_path / "bank"
    save_filters(out, torch.stack(banks), {"learn": {"preprocess": "unit"}})
    return out


def test_validation_split_is_class_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    tr, va = validation_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 200
    assert np.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(va, validation_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(va, validation_split(labels, 0.1, seed=4)[1])


def test_standardiser_scales_tiny_features_and_ignores_constant_ones():
    spec = spec_from_dict(SPEC)
    net = NNLNet(spec, [torch.randn(12, 3, 4, 4)])
    d = net.feature_mean.numel()
    rng = np.random.default_rng(0)
    feats = (rng.uniform(0, 1, (500, d)) ** 40).astype(np.float32)   # like cos^40: spans decades
    feats[:, 0] = 0.25
    fit_standardiser(net, feats)
    z = (torch.from_numpy(feats) - net.feature_mean) * net.feature_scale
    assert net.feature_scale[0] == 0 and z[:, 0].abs().max() == 0
    assert_close(z[:, 1:].std(0, unbiased=False), torch.ones(d - 1), rtol=0, atol=1e-3, what="unit std")


def test_head_without_standardiser_sees_the_raw_features():
    from edgehebb.nnl.train import train_head

    net = NNLNet(spec_from_dict(SPEC), [torch.randn(12, 3, 4, 4)])
    d = net.feature_mean.numel()
    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 2, (60, d)).astype(np.float32)
    labels = np.arange(60) % 3
    net.feature_mean.fill_(5.0)   # left over from an earlier fit: must not survive
    train_head(net, feats, labels, TrainConfig(epochs=1, standardise=False), log=lambda s: None, progress=False)
    assert torch.equal(net.feature_mean, torch.zeros(d)) and torch.equal(net.feature_scale, torch.ones(d))
    train_head(net, feats, labels, TrainConfig(epochs=1), log=lambda s: None, progress=False)
    assert not torch.equal(net.feature_scale, torch.ones(d))


def test_head_on_frozen_filters_learns_and_round_trips(bank_dir, tmp_path, monkeypatch):
    spec = spec_from_dict(SPEC)
    train, test = _gratings(240, 0), _gratings(90, 1)
    record = train_to_dir(spec, train, tmp_path / "m", training=FAST, filters_from=[bank_dir], device="cpu",
                          cache=str(tmp_path / "cache"), progress=False, log=lambda s: None)
    assert record["training"]["best_epoch"] >= 1 and record["filters"]["from"] == [str(bank_dir)]
    assert record["filters"]["learn"] == [{"preprocess": "unit"}]   # the bank's own settings, not train's
    net, config = load_model(tmp_path / "m")
    assert config["kind"] == "nnl" and config["classes"] == ["h", "v", "d"]
    acc = float((predict(net, test.x) == test.y).mean())
    assert acc > 0.8, acc   # chance is 1/3
    # the feature cache holds one entry, and a second run reads it back instead of computing
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    monkeypatch.setattr(features, "compute_features", lambda *a, **k: pytest.fail("features recomputed"))
    again = train_to_dir(spec, train, tmp_path / "m2", training=FAST, filters_from=[bank_dir], device="cpu",
                         cache=str(tmp_path / "cache"), progress=False, log=lambda s: None)
    assert [h["val_accuracy"] for h in again["training"]["history"]] == \
        [h["val_accuracy"] for h in record["training"]["history"]]
    net2, _ = load_model(tmp_path / "m2")
    x = torch.from_numpy(test.x[:8]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(net(x), net2(x))   # same seed, same cached features: the same model


def test_feature_cache_key_tells_networks_with_the_same_tensors_apart():
    from edgehebb.nnl import ConvNet

    spec, images = spec_from_dict(SPEC), _gratings(4, 0).x
    torch.manual_seed(0)
    a = ConvNet(spec, power=1.0)
    b = ConvNet(spec, power=3.0)
    b.load_state_dict(a.state_dict())
    keys = {features.features_key(net, images) for net in (a, b)}
    assert len(keys) == 2   # same tensors, different features
    assert features.features_key(a, images) == features.features_key(a, images)


def test_baseline_trains_end_to_end_and_reloads(tmp_path):
    spec = spec_from_dict(SPEC)
    train = _gratings(240, 0)
    train_to_dir(spec, train, tmp_path / "b", training=FAST, baseline=True, device="cpu", progress=False,
                 log=lambda s: None)
    net, config = load_model(tmp_path / "b")
    assert config["kind"] == "conv" and config["conv"] == {"power": 1.0, "patch_norm": False}
    test = _gratings(90, 1)
    assert float((predict(net, test.x) == test.y).mean()) > 0.6


def test_evaluate_reports_clean_shadowed_per_class_and_sweep(bank_dir, tmp_path):
    spec = spec_from_dict(SPEC)
    train_to_dir(spec, _gratings(120, 0), tmp_path / "m", training=TrainConfig(epochs=3, val_fraction=0.2),
                 filters_from=[bank_dir], device="cpu", cache="", progress=False, log=lambda s: None)
    net, config = load_model(tmp_path / "m")
    r = evaluate(net, _gratings(30, 1), config["classes"], sweep=(0.3, 0.6), progress=False)
    assert set(r["clean"]["per_class"]) == {"h", "v", "d"}
    assert 0 <= r["shadowed"]["accuracy"] <= 1 and r["shadowed"]["intensity"] == 0.3
    assert [p["intensity"] for p in r["sweep"]] == [0.3, 0.6, 1.0]
    assert r["sweep"][-1]["error"] == pytest.approx(r["clean"]["error"])
    assert r["sweep"][0]["error"] == pytest.approx(r["shadowed"]["error"])
    with pytest.raises(EdgehebbError, match="classes"):
        evaluate(net, ImageSet(np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2, np.int64), ["a", "b", "c"], "x"),
                 config["classes"], progress=False)


def test_load_model_rejects_non_models(tmp_path, bank_dir):
    with pytest.raises(EdgehebbError, match="filter bank"):
        load_model(bank_dir)
    with pytest.raises(EdgehebbError, match="neither a directory nor a shipped model"):
        load_model("no-such-model")
    spec = spec_from_dict(SPEC)
    save_model(tmp_path / "m", NNLNet(spec, [torch.randn(12, 3, 4, 4)]), ["h", "v", "d"])
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(EdgehebbError, match="safetensors"):
        load_model(tmp_path / "m")
    save_model(tmp_path / "c", ConvNet(spec, power=3.0), ["h", "v", "d"])
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    for bad in ({"power": "x"}, "str", {"power": 2, "patch_norm": "false"}, {"power": -1}, {"power": True}):
        (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "conv": bad}))
        with pytest.raises(EdgehebbError, match=r"config.json: 'conv' must be an object"):
            load_model(tmp_path / "c")


def test_nnl_net_with_trainable_filters_saves_unit_filters(tmp_path):
    spec = spec_from_dict(SPEC)
    torch.manual_seed(0)
    net = NNLNet(spec, [torch.randn(12, 3, 4, 4)], trainable_filters=True)
    with torch.no_grad():
        net.blocks[0].weight.mul_(5.0)   # raw scale: the layer normalises it, a frozen reload must too
    save_model(tmp_path / "m", net, ["h", "v", "d"])
    again, _ = load_model(tmp_path / "m")
    x = torch.rand(3, 3, 16, 16)
    assert_close(again(x), net(x), rtol=0, atol=1e-5, what="logits after reload")


def _npz(path, data: ImageSet):
    np.savez(path, x=data.x, y=data.y, classes=np.array(data.classes))
    return path


def _grating_folder(root: Path, train: int, test: int = 0) -> Path:
    """A data folder ``root`` (made here): train.npz of ``train`` gratings (seed 0), and test.npz of ``test``
    (seed 1) unless 0."""
    root.mkdir()
    _npz(root / "train.npz", _gratings(train, 0))
    if test:
        _npz(root / "test.npz", _gratings(test, 1))
    return root


def test_cli_train_and_eval(bank_dir, tmp_path):
    data = _grating_folder(tmp_path / "data", 120, 30)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--spec", str(spec_file), "--data", str(data), "--out", str(tmp_path / "m"),
                              "--filters-from", str(bank_dir), "--epochs", "15", "-B", "32", "--lr", "1e-2",
                              "--device", "cpu", "--no-cache", "--val-fraction", "0.2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["training"]["val_images"] == 24
    res = runner.invoke(cli, ["eval", str(tmp_path / "m"), "--data", str(data), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # the figures are the library's for this model and these images, and the model learned the gratings
    net, config = load_model(tmp_path / "m")
    want = evaluate(net, load_split(data, "test", progress=False), config["classes"], progress=False)
    for key in ("clean", "shadowed"):
        assert out[key]["accuracy"] == want[key]["accuracy"] and out[key]["per_class"] == want[key]["per_class"], key
    assert out["sweep"] == want["sweep"] and len(out["sweep"]) > 2
    # chance 1/3; measured 0.9 (27 of 30, 2026-12-04, 1 or 2 threads); the floor is 2 SE (0.11) below
    assert out["clean"]["accuracy"] >= 0.79, out["clean"]
    assert (tmp_path / "m" / "eval.png").stat().st_size > 1000


def test_augmentation_perturbs_only_training_images_and_is_recorded(bank_dir, tmp_path):
    """--augment: the validation images stay clean (the epoch is chosen as without), the others are
    perturbed with the given probability, seeded; the model's config.json records it."""
    data = _gratings(120, 0)
    fit = TrainConfig(augment="low-light,wb-warm", augment_fraction=1.0, val_fraction=0.2)
    x = training_images(data, fit)
    train_idx, val_idx = validation_split(data.y, 0.2, 0)
    assert np.array_equal(x[val_idx], data.x[val_idx])
    changed = (x[train_idx] != data.x[train_idx]).any(axis=(1, 2, 3))
    assert changed.mean() > 0.9, changed.mean()
    assert np.array_equal(training_images(data, fit), x)                      # seeded
    assert training_images(data, TrainConfig()) is data.x                       # off: the images themselves
    half = training_images(data, TrainConfig(augment="low-light", augment_fraction=0.5, val_fraction=0.2))
    assert 0.2 < (half[train_idx] != data.x[train_idx]).any(axis=(1, 2, 3)).mean() < 0.8
    root = tmp_path / "data"
    root.mkdir()
    _npz(root / "train.npz", data)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec_file), "--data", str(root), "--out", str(tmp_path / "m"),
                                   "--filters-from", str(bank_dir), "--epochs", "2", "--device", "cpu", "--no-cache",
                                   "--augment", "low-light", "--augment-fraction", "0.7", "--json"])
    assert res.exit_code == 0, res.output
    fit_record = json.loads((tmp_path / "m" / "config.json").read_text())["fit"]
    assert (fit_record["augment"], fit_record["augment_fraction"]) == ("low-light", 0.7)


@pytest.mark.parametrize("args, message", [
    (["--spec", "nope"], "unknown model spec 'nope'"),
    (["--patch-norm"], "only apply with --baseline"),
    (["--baseline", "--learn-epochs", "3", "--no-cache"], "--learn-epochs, --no-cache do not apply with --baseline"),
    (["--augment", "low-light,fog"], "unknown camera condition 'fog'"),
])
def test_cli_train_bad_options(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "m"), "--data", str(tmp_path), *args])
    assert res.exit_code != 0 and message in str(res.exception)


# measured 2026-12-04 (1 and 2 torch threads alike) by the test below: accuracy on its 1,000 test images
REAL_DATA_MEASURED = {"clean": 0.548, "shadowed": 0.511}
REAL_DATA_TEST_IMAGES = 1000


@pytest.mark.data
def test_real_data_train_eval_beats_floor(cifar_root, tmp_path):
    """fig2_left on 2,000 CIFAR-10 training images (filters learned here, B=100), 10 head epochs, on 1,000
    test images (chance 10%; the centred recipe before 2026-12-01 reached 0.41 clean). Each floor is 2
    standard errors below the measured figure: 0.517 clean, 0.479 shadowed."""
    from edgehebb.nnl import load_spec

    train = load_split(cifar_root, "train", limit=2000, progress=False)
    test = load_split(cifar_root, "test", limit=REAL_DATA_TEST_IMAGES, progress=False)
    train_to_dir(load_spec("fig2_left"), train, tmp_path / "m", training=TrainConfig(epochs=10), backend="torch",
                 device="cpu", learn={"batch": 100}, cache="", progress=False, log=lambda s: None)
    net, config = load_model(tmp_path / "m")
    r = evaluate(net, test, config["classes"], sweep=None, progress=False)
    for figure, p in REAL_DATA_MEASURED.items():
        floor = p - 2 * (p * (1 - p) / REAL_DATA_TEST_IMAGES) ** 0.5
        assert r[figure]["accuracy"] >= floor, (figure, r[figure]["accuracy"], p, floor)


def test_cli_eval_png_needs_the_sweep_and_a_writable_path(bank_dir, tmp_path):
    res = CliRunner().invoke(cli, ["eval", str(bank_dir), "--no-sweep", "--png", str(tmp_path / "x.png")])
    assert isinstance(res.exception, EdgehebbError) and "--no-sweep" in str(res.exception)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(cli, ["eval", str(bank_dir), "--data", str(tmp_path / "none"),
                                   "--png", str(tmp_path / "file" / "x.png")])
    assert isinstance(res.exception, EdgehebbError) and "cannot write" in str(res.exception)


def test_unwritable_feature_cache_keeps_the_features(bank_dir, tmp_path):
    from edgehebb.nnl.features import cached_features
    from edgehebb.io import load_filters

    net = NNLNet(spec_from_dict(SPEC), [load_filters(bank_dir)[0]])
    (tmp_path / "file").write_text("x")
    images = _gratings(6, 0).x
    with pytest.warns(UserWarning, match="could not write the feature cache"):
        feats = cached_features(net, images, cache=str(tmp_path / "file" / "sub"), progress=False)
    assert np.array_equal(feats, features.compute_features(net, images, progress=False))


def test_freshly_computed_features_come_back_memory_mapped(bank_dir, tmp_path):
    # The wide model's two feature matrices are 5 GB each: once written, the head must read them from
    # the cache file (as a hit does), not hold them in memory beside its own standardised copy.
    from edgehebb.io import load_filters
    from edgehebb.nnl.features import cached_features

    net = NNLNet(spec_from_dict(SPEC), [load_filters(bank_dir)[0]])
    images = _gratings(7, 0).x
    feats = cached_features(net, images, cache=str(tmp_path / "cache"), progress=False)
    assert isinstance(feats, np.memmap) and not feats.flags.writeable
    assert np.array_equal(feats, features.compute_features(net, images, batch=3, progress=False))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "other shape"])
def test_a_damaged_feature_cache_entry_is_recomputed_and_replaced(bank_dir, tmp_path, monkeypatch, damage):
    from edgehebb.io import load_filters
    from edgehebb.nnl.features import cached_features, features_key

    net = NNLNet(spec_from_dict(SPEC), [load_filters(bank_dir)[0]])
    images = _gratings(6, 0).x
    want = features.compute_features(net, images, progress=False)
    cache = tmp_path / "cache"
    assert np.array_equal(cached_features(net, images, cache=str(cache), progress=False), want)
    entry = cache / f"{features_key(net, images)}.npy"
    good = entry.read_bytes()
    damaged = {"empty": b"", "truncated": good[:len(good) // 2], "garbage": bytes(range(256)) * 4}
    if damage == "other shape":   # a readable array of the right length that is not these features
        np.save(entry, np.zeros((len(images), 3), np.float32))
    else:
        entry.write_bytes(damaged[damage])
    assert np.array_equal(cached_features(net, images, cache=str(cache), progress=False), want)
    assert entry.read_bytes() == good   # replaced: the next run reads it instead of computing
    monkeypatch.setattr(features, "compute_features", lambda *a, **k: pytest.fail("features recomputed"))
    assert np.array_equal(cached_features(net, images, cache=str(cache), progress=False), want)


def test_banks_left_by_an_earlier_run_must_match_its_settings(tmp_path):
    spec = spec_from_dict(SPEC)
    train = _gratings(60, 0)
    quiet = dict(device="cpu", cache="", progress=False, log=lambda s: None)
    learn = {"epochs": 1, "batch": 200}
    first = train_to_dir(spec, train, tmp_path / "m", training=FAST, learn=learn, **quiet)
    (tmp_path / "m" / "config.json").unlink()   # as if the head's training had been interrupted
    again = train_to_dir(spec, train, tmp_path / "m", training=FAST, learn=learn, **quiet)
    assert again["filters"]["from"] == first["filters"]["from"]   # the finished bank is reused
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(EdgehebbError, match="was learned with other settings or data .*epochs=1"):
        train_to_dir(spec, train, tmp_path / "m", training=FAST, learn={**learn, "epochs": 2}, **quiet)
    with pytest.raises(EdgehebbError, match="other settings or data .*data"):
        train_to_dir(spec, _gratings(30, 0), tmp_path / "m", training=FAST, learn=learn, **quiet)


# ---------------------------------------------------------------- corrupt files fail first, in one line

def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-64:-32] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _model(tmp_path, name="m"):
    save_model(tmp_path / name, NNLNet(spec_from_dict(SPEC), [torch.randn(12, 3, 4, 4)]), ["h", "v", "d"])
    return tmp_path / name


def test_corrupt_model_file_is_refused(tmp_path):
    model = _model(tmp_path)
    load_model(model)
    _corrupt(model / "model.safetensors")
    with pytest.raises(EdgehebbError, match=r"model.safetensors is corrupt"):
        load_model(model)


def test_bad_models_and_banks_fail_before_the_data_is_read(bank_dir, tmp_path, monkeypatch):
    import edgehebb.data

    model = _model(tmp_path)
    _corrupt(model / "model.safetensors")
    monkeypatch.setattr(edgehebb.data, "load_split", lambda *a, **k: pytest.fail("data read before the model"))
    res = CliRunner().invoke(cli, ["eval", str(model), "--data", str(tmp_path), "--no-sweep"])
    assert isinstance(res.exception, EdgehebbError) and "is corrupt" in str(res.exception)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))
    _corrupt(bank_dir / "filters.safetensors")
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec_file), "--data", str(tmp_path), "--out",
                                   str(tmp_path / "t"), "--filters-from", str(bank_dir)])
    assert isinstance(res.exception, EdgehebbError) and "filters.safetensors is corrupt" in str(res.exception)
    res = CliRunner().invoke(cli, ["train", "--spec", "fig2_left", "--data", str(tmp_path), "--out",
                                   str(tmp_path / "t"), "--filters-from", str(tmp_path / "t2")])
    assert res.exit_code != 0
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec_file), "--data", str(tmp_path), "--out",
                                   str(tmp_path / "t"), "--filters-from", str(tmp_path / "empty")])
    assert isinstance(res.exception, EdgehebbError) and "no filter bank" in str(res.exception)


# ---------------------------------------------------------------- what the commands print and record

def test_eval_text_output_has_the_per_class_figures(bank_dir, tmp_path):
    data = _grating_folder(tmp_path / "data", 60, 30)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec_file), "--data", str(data), "--out", str(tmp_path / "m"),
                                   "--filters-from", str(bank_dir), "--epochs", "2", "--device", "cpu", "--no-cache",
                                   "--val-fraction", "0.2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["threads"]["requested"] == 1 and config["kind"] == "nnl"
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "m"), "--data", str(data), "--device", "cpu", "--no-sweep"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines() if line.startswith("  ")}
    assert set(rows) == {"class", "h", "v", "d"} and rows["class"] == ["clean", "shadowed"]
    assert all(len(v) == 2 and v[0].endswith("%") for k, v in rows.items() if k != "class")


def test_show_draws_the_filters_of_a_model(tmp_path):
    model = _model(tmp_path)
    res = CliRunner().invoke(cli, ["show", str(model), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["colour_units"] + json.loads(res.stdout)["bw_units"] == 12
    assert (model / "filters.png").read_bytes()[:4] == b"\x89PNG"
    two = {**SPEC, "blocks": SPEC["blocks"] * 2}
    save_model(tmp_path / "two", NNLNet(spec_from_dict(two), [torch.randn(12, 3, 4, 4)] * 2), ["h", "v", "d"])
    res = CliRunner().invoke(cli, ["show", str(tmp_path / "two"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f-block0.png").is_file() and (tmp_path / "f-block1.png").is_file()
    res = CliRunner().invoke(cli, ["show", "fig2_left-cifar10", "--out", str(tmp_path / "shipped.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "shipped.png").is_file()


def test_skipped_files_are_listed_in_config_json(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train",):
        for c, name in enumerate(["h", "v", "d"]):
            d = tmp_path / "data" / split / name
            d.mkdir(parents=True)
            for i, img in enumerate(_gratings(24, c).x[c::3]):
                Image.fromarray(img).save(d / f"{i:03d}.jpg")
    bad = tmp_path / "data" / "train" / "v" / "003.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(cli, ["learn", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bank"),
                                   "-K", "12", "-B", "50", "--device", "cpu", "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image(s)" in res.stderr and "v/003.jpg" in res.stderr
    assert "Warning" not in res.stderr
    assert json.loads((tmp_path / "bank" / "config.json").read_text())["skipped_images"] == ["v/003.jpg"]
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(SPEC))
    res = CliRunner().invoke(cli, ["train", "--spec", str(spec_file), "--data", str(tmp_path / "data"), "--out",
                                   str(tmp_path / "m"), "--filters-from", str(tmp_path / "bank"), "--epochs", "1",
                                   "--device", "cpu", "--no-cache", "--val-fraction", "0.2", "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["skipped_images"] == ["v/003.jpg"]


def test_a_bank_taken_from_a_model_records_that_blocks_learn_settings(bank_dir, tmp_path):
    quiet = {"device": "cpu", "progress": False, "log": lambda line: None, "cache": ""}
    spec, data = spec_from_dict(SPEC), _gratings(60, 0)
    first = train_to_dir(spec, data, tmp_path / "a", training=FAST, filters_from=[bank_dir], **quiet)
    assert first["filters"]["learn"] == [{"preprocess": "unit"}]     # the bank directory's own record
    second = train_to_dir(spec, data, tmp_path / "b", training=FAST, filters_from=[tmp_path / "a"], **quiet)
    assert second["filters"]["learn"] == [{"preprocess": "unit"}], "one dict per block, not the model's list"
    assert second["filters"]["from"] == [str(tmp_path / "a")]
