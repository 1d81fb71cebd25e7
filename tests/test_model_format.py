"""models/MODEL_FORMAT.md is enough to run a model: its forward pass, written here in numpy from the
document alone (the files read with the safetensors and json packages, no edgehebb code), gives every
shipped model's logits as edgehebb.Runtime does, within OP_SPEC's tolerance, and those of a small whitened
model trained here and of small models with a linear head and a hidden layer (so those steps are checked
whatever ships)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgehebb.nnl.model import resolve_model, shipped_models

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = shipped_models()
per_model = pytest.mark.parametrize("model", [resolve_model(name) for name in SHIPPED], ids=SHIPPED)
BLOCK_DEFAULTS = {"stride": 1, "padding": 0, "center": False, "norm": True, "sigma": 0.0}


def document_forward(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 (N, H, W, 3) RGB images, step by step as MODEL_FORMAT.md says, in float64."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["spec"].get("head_hidden", 0)
    assert config["format"] == f"edgehebb.model/{2 if hidden else 1}" and config["kind"] == "nnl"
    t = load_file(str(model_dir / "model.safetensors"))
    spec = config["spec"]
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0                     # step 1: (N, C, H, W)
    if spec.get("colour_norm", "none") == "gray-world":                               # step 2
        mu = x.mean(axis=(2, 3), keepdims=True)
        x = x * (mu.mean(axis=1, keepdims=True) / np.maximum(mu, 1e-3))
    feats = []
    for i, raw in enumerate(spec["blocks"]):                                          # step 3
        b = {**BLOCK_DEFAULTS, "pool_stride": raw["pool"], **raw}
        m = t[f"blocks.{i}.weight"].astype(np.float64)                # (K, C, W, W), or (K, N, 1, 1) whitened
        k = m.shape[0]
        c, w = x.shape[1], raw["kernel"]
        p, s = b["padding"], b["stride"]
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        rows, cols = (xp.shape[2] - w) // s + 1, (xp.shape[3] - w) // s + 1
        # every patch as a vector in (c, y, x) order: (N, rows, cols, C*W*W)
        win = np.lib.stride_tricks.sliding_window_view(xp, (w, w), axis=(2, 3))[:, :, ::s, ::s]
        v = win.transpose(0, 2, 3, 1, 4, 5).reshape(len(x), rows, cols, c * w * w)
        if b["center"]:
            v = v - v.mean(axis=-1, keepdims=True)
        if b.get("whiten", 0) > 0:                                                    # v = Z v
            v = v @ t[f"blocks.{i}.whitening"].astype(np.float64).reshape(c * w * w, -1).T
        dot = v @ m.reshape(k, -1).T                                                  # (N, rows, cols, K)
        if b["norm"]:
            dot = dot / (np.sqrt((v * v).sum(-1, keepdims=True) + b["sigma"] ** 2) + 1e-4)
        P, Ps = b["pool"], b["pool_stride"]
        hp, wp = (rows - P) // Ps + 1, (cols - P) // Ps + 1
        pooled = np.empty((len(x), k, hp, wp))
        for r in range(hp):
            for q in range(wp):
                pooled[:, :, r, q] = dot[:, r * Ps:r * Ps + P, q * Ps:q * Ps + P].max(axis=(1, 2))
        y = np.clip(pooled, 0, 1 if b["norm"] else None) ** b["power"]
        feats.append(y.reshape(len(x), -1))                                           # step 4: (k, row, col)
    f = np.concatenate(feats, axis=1)
    z = (f - t["feature_mean"]) * t["feature_scale"]                                  # step 5
    if hidden:                                                                        # step 6
        z = np.maximum(z @ t["head.hidden.weight"].T.astype(np.float64) + t["head.hidden.bias"], 0)
        return z @ t["head.out.weight"].T.astype(np.float64) + t["head.out.bias"]
    return z @ t["head.weight"].T.astype(np.float64) + t["head.bias"]


def _images(n: int = 24, seed: int = 0) -> np.ndarray:
    """Natural-looking test images without the data set: smooth colour fields with edges and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        base = rng.uniform(0.1, 0.9, 3)[:, None, None] + rng.normal(0, 0.25, (3, 1, 1)) * (xx - rng.uniform())
        edge = (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1) > rng.uniform(-0.5, 0.5)) * rng.uniform(-0.4, 0.4, (3, 1, 1))
        img = np.clip(base + edge + rng.normal(0, 0.03, (3, 32, 32)), 0, 1)
        out.append((img.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return np.stack(out)


def _check_document_against_edgehebb(model: Path, images: np.ndarray) -> None:
    import torch

    from edgehebb import Runtime
    from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
    from edgehebb.nnl import load_model

    want = document_forward(model, images)
    with Runtime(model, backend="torch", device="cpu") as rt:
        got = rt.predict(images)
    # Runtime returns probabilities; the document's logits give them through a softmax
    e = np.exp(want - want.max(1, keepdims=True))
    assert np.abs(got.probabilities - e / e.sum(1, keepdims=True)).max() < 1e-4
    assert (got.class_ids == want.argmax(1)).all()
    # and the logits themselves, from the torch reference, within OP_SPEC's tolerance of the document's
    net, _ = load_model(model)
    with torch.no_grad():
        logits = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    assert parity_error(logits, want).max() <= PARITY_TOLERANCE


def test_the_paper_model_is_among_those_checked():
    assert "fig2_left-cifar10" in SHIPPED


@per_model
def test_the_document_computes_the_shipped_models_logits(model):
    _check_document_against_edgehebb(model, _images())


def test_the_document_computes_a_whitened_models_logits(whitened_model):
    # the whitening step (step 3, whitened block) on a small whitened model trained here (conftest)
    from tests.test_train import _gratings

    model, _ = whitened_model
    t = load_file(str(model / "model.safetensors"))
    assert t["blocks.0.whitening"].shape == (48, 3, 4, 4)
    _check_document_against_edgehebb(model, _gratings(9, 3).x)


@pytest.mark.parametrize("hidden", [0, 8], ids=["linear", "hidden"])
def test_the_document_computes_both_heads(hidden, tmp_path):
    import torch

    from edgehebb.nnl import NNLNet, save_model, spec_from_dict
    from edgehebb.nnl.train import fit_standardiser

    g = torch.Generator().manual_seed(hidden)
    spec = spec_from_dict({"name": "tiny", "input": [3, 32, 32], "classes": 3, "head_hidden": hidden,
                           "blocks": [{"kernel": 4, "filters": 12, "power": 5, "pool": 11, "pool_stride": 6}]})
    net = NNLNet(spec, [torch.randn(12, 3, 4, 4, generator=g)])
    images = _images(48, seed=1)   # the standardiser from enough images that no feature's spread is ~0
    with torch.no_grad():
        fit_standardiser(net, net.features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy())
        for p in net.head.parameters():
            p.normal_(0, 0.5, generator=g)
    save_model(tmp_path / "m", net, ["a", "b", "c"])
    _check_document_against_edgehebb(tmp_path / "m", images[:12])


@per_model
def test_a_misread_standardiser_is_caught(model):
    # the other reading of the standardiser, (f - mean) / scale, must not pass the check above
    t = load_file(str(model / "model.safetensors"))
    assert not np.allclose(t["feature_scale"], 1.0), "a scale of ones could not tell the two readings apart"


@per_model
def test_the_documented_checksum_is_the_files(model):
    t = load_file(str(model / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(t):
        h.update(json.dumps([name, "torch.float32", list(t[name].shape)]).encode())
        h.update(np.ascontiguousarray(t[name]).tobytes())
    header_len = int.from_bytes((model / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((model / "model.safetensors").read_bytes()[8:8 + header_len])
    assert header["__metadata__"]["edgehebb.sha256"] == h.hexdigest()


@per_model
@pytest.mark.parametrize("key", ["format", "kind", "spec", "classes", "input", "data"])
def test_the_shipped_config_has_the_documented_keys(model, key):
    config = json.loads((model / "config.json").read_text())
    assert key in config
    assert f"`{key}`" in (MODELS / "MODEL_FORMAT.md").read_text()


@per_model
def test_the_shipped_config_names_no_path_of_the_training_machine(model):
    text = (model / "config.json").read_text()
    config = json.loads(text)
    assert "/work/" not in text and "/home/" not in text and "/root/" not in text
    assert config["data"]["name"] == "cifar10/train" and config["data"]["fingerprint"].startswith("sha256:")
