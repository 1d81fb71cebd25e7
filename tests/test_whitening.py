"""Whitened blocks (issue 24): patches whitened by a learned linear map Z before the patch norm, learned with
``edgehebb learn --whiten`` and run by every backend as a standard Conv before the op.

Tolerances as elsewhere: the torch block against the float64 formula within 1e-5 of the largest feature;
ONNX (both forms), OpenCV DNN and onnx's reference evaluator within OP_SPEC's 1e-4 of a row's largest logit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from edgehebb.errors import EdgehebbError
from edgehebb.io import load_filters, load_whitening
from edgehebb.learn.loop import LearnConfig, learn, resolve_backend
from edgehebb.learn.patches import PatchSampler, preprocess, whitening_matrix
from edgehebb.nnl import NNLNet, load_model, save_model, spec_from_dict
from edgehebb.nnl.train import fit_standardiser
from tests.test_train import _gratings

SPEC = {"name": "white", "input": [3, 16, 16], "classes": 3,
        "blocks": [{"kernel": 4, "filters": 12, "power": 5, "pool": 5, "pool_stride": 4, "whiten": 0.1}]}


def _images(n: int = 40, seed: int = 0) -> np.ndarray:
    return _gratings(n, seed).x


def test_the_whitening_matrix_flattens_the_patch_spectrum():
    images = torch.from_numpy(_images()).permute(0, 3, 1, 2).contiguous()
    z = whitening_matrix(images, 4, 1, 0.1, seed=0)
    assert torch.equal(z, z.T) and z.shape == (48, 48)
    sampler = PatchSampler(images, 4)
    u = preprocess(sampler.gather(torch.arange(sampler.n_patches)), "unit").double()
    s = u.T @ u / len(u)
    lam = torch.linalg.eigvalsh(s)
    # Z S Z = U diag(lambda / (lambda + 0.1 mean lambda)) U^T on the whole set (Z came from a sample of it)
    got = torch.linalg.eigvalsh(z.double() @ s @ z.double())
    want = torch.sort(lam / (lam + 0.1 * lam.mean())).values
    assert torch.allclose(got, want, atol=0.05), (got[-3:], want[-3:])
    assert torch.equal(z, whitening_matrix(images, 4, 1, 0.1, seed=0)), "seeded"
    with pytest.raises(EdgehebbError, match="regulariser must be > 0"):
        whitening_matrix(images, 4, 1, 0.0, seed=0)


def test_a_whitened_block_is_the_formula():
    spec = spec_from_dict({**SPEC, "input": [3, 32, 32], "blocks": [{**SPEC["blocks"][0], "pool": 11, "pool_stride": 6,
                                                                      "stride": 2, "padding": 1}]})
    g = torch.Generator().manual_seed(0)
    z = torch.randn(48, 48, generator=g)
    net = NNLNet(spec, [(torch.randn(12, 48, 1, 1, generator=g), z.reshape(48, 3, 4, 4))])
    x = torch.rand(3, 3, 32, 32, generator=g)
    p = F.unfold(F.pad(x.double(), [1] * 4), 4, stride=2).transpose(1, 2)     # (B, L, 48), (c, y, x) order
    w = p @ z.double().T
    u = w / (w.norm(dim=-1, keepdim=True) + 1e-4)
    m = net.blocks[0].weight.flatten(1).double()
    side = (34 - 4) // 2 + 1
    cos = (u @ m.T).transpose(1, 2).reshape(3, 12, side, side)
    want = F.max_pool2d(cos, 11, 6).clamp(0, 1).pow(5).flatten(1)
    got = net.features(x).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert spec_from_dict(spec.to_dict()) == spec and "whiten" in spec.to_dict()["blocks"][0]
    assert "whiten" not in spec_from_dict({**SPEC, "blocks": [{"kernel": 4, "filters": 2, "power": 1, "pool": 2}]
                                           }).to_dict()["blocks"][0], "plain specs read and write as before"


@pytest.mark.parametrize("block, message", [({"whiten": -1}, "whiten must be a number >= 0"),
                                            ({"whiten": 0.1, "center": True}, "whiten needs the plain patch norm"),
                                            ({"whiten": 0.1, "norm": False}, "whiten needs the plain patch norm")])
def test_bad_whitened_specs_name_the_key(block, message):
    with pytest.raises(EdgehebbError, match=message):
        spec_from_dict({**SPEC, "blocks": [{**SPEC["blocks"][0], **block}]})


def test_learning_on_whitened_patches_resumes_bitwise_and_needs_torch(tmp_path):
    from edgehebb.learn.directory import learn_to_dir

    images = _images()
    config = LearnConfig(filters=12, kernel=4, batch=50, epochs=2, whiten=0.1)
    quiet = {"data_key": {"source": "gratings"}, "backend": "torch", "device": "cpu", "progress": False,
             "log": lambda line: None}
    summary = learn_to_dir(images, config, tmp_path / "bank", **quiet)
    filters, saved = load_filters(tmp_path / "bank")
    z = load_whitening(tmp_path / "bank")
    assert filters.shape == (12, 48, 1, 1) and z.shape == (48, 3, 4, 4) and saved["learn"]["whiten"] == 0.1
    assert (filters.flatten(1).norm(dim=1) - 1).abs().max() < 0.05, "rows converge to unit length as before"
    assert summary["colour_orientation"]["colour_units"] + summary["colour_orientation"]["bw_units"] == 12
    from edgehebb.nnl.model import model_filters

    (_, shown), = model_filters(tmp_path / "bank")[0]   # `edgehebb show`: the units in pixels, Z m
    assert torch.allclose(shown.flatten(1), filters.flatten(1) @ z.flatten(1))
    # the same run in one go, and continued from a snapshot of its first epoch, give the same bank
    from edgehebb.learn.loop import LearnState

    after_one = []
    once = learn(images, config, progress=False, on_epoch=lambda s: after_one.append(
        LearnState(s.weights.clone(), s.epochs_done, list(s.history), whitening=s.whitening)) if s.epochs_done == 1
        else None)
    assert torch.equal(once.weights.reshape(12, 48, 1, 1), filters)
    assert torch.equal(once.whitening.reshape(48, 3, 4, 4), z)
    resumed = learn(images, config, progress=False, state=after_one[0])
    assert torch.equal(resumed.weights, once.weights)
    with pytest.raises(EdgehebbError, match="another --whiten"):
        learn(images, LearnConfig(filters=12, kernel=4, batch=50, epochs=2), progress=False, state=after_one[0])
    with pytest.raises(EdgehebbError, match="--whiten needs --backend torch"):
        resolve_backend("pycuda", "cuda", config)
    assert resolve_backend("auto", "cuda", config) == "torch"
    with pytest.raises(EdgehebbError, match="works with --preprocess unit only"):
        LearnConfig(whiten=0.1, preprocess="center-unit").check((16, 16, 3))


def test_a_whitened_model_trains_and_runs_the_same_everywhere(whitened_model, tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from edgehebb import Runtime
    from edgehebb.deploy.onnx_export import export_onnx

    model_dir, record = whitened_model   # conftest: SPEC trained on 90 gratings
    assert record["filters"]["learn"][0]["whiten"] == 0.1 and record["training"]["val_accuracy"] > 0.5
    net, _ = load_model(model_dir)
    assert net.blocks[0].whitening.shape == (48, 3, 4, 4)
    frames = (np.random.default_rng(1).random((7, 16, 16, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ref = net.double()(x.double())
    for standard in (False, True):
        path = export_onnx(str(model_dir), tmp_path / f"m-{standard}.onnx", standard_ops=standard)
        model = onnx.load(str(path))
        assert [n.op_type for n in model.graph.node if n.name == "block0.whiten"] == ["Conv"], "a standard Conv"
        got = ReferenceEvaluator(model).run(["logits"], {"images": x.numpy()})[0]
        assert parity_error(got, ref).max() <= PARITY_TOLERANCE, ("reference evaluator", standard)
    with Runtime(model_dir, backend="torch") as t, Runtime(model_dir, backend="onnxruntime") as o, \
            Runtime(model_dir, backend="opencv") as c:
        want = t.predict(frames).probabilities
        for other in (o, c):
            assert np.abs(other.predict(frames).probabilities - want).max() < 1e-5, other.backend


def test_banks_match_whitened_and_plain_blocks_apart(tmp_path):
    from edgehebb.nnl.banks import find_bank

    g = torch.Generator().manual_seed(0)
    white = spec_from_dict(SPEC)
    plain = spec_from_dict({**SPEC, "blocks": [{k: v for k, v in SPEC["blocks"][0].items() if k != "whiten"}]})
    net = NNLNet(white, [(torch.randn(12, 48, 1, 1, generator=g), torch.randn(48, 3, 4, 4, generator=g))])
    with torch.no_grad():
        fit_standardiser(net, net.features(torch.rand(4, 3, 16, 16, generator=g)).numpy())
    save_model(tmp_path / "w", net, ["a", "b", "c"])
    found = find_bank([tmp_path / "w"], white.blocks[0], 3)
    assert found is not None and isinstance(found.bank(), tuple) and torch.equal(found.whitening,
                                                                                net.blocks[0].whitening)
    assert find_bank([tmp_path / "w"], plain.blocks[0], 3) is None
    assert json.loads((tmp_path / "w" / "config.json").read_text())["spec"]["blocks"][0]["whiten"] == 0.1
