"""The op's robustness options (issue 15): a block's semi-saturation ``sigma`` and the net's ``colour_norm``.

Off (sigma 0, colour_norm "none") they are today's op bit for bit, and the files they write are
today's (op version 1). On, every path computes the same numbers: the torch reference in float32 and
float64, ONNX Runtime on both export forms, onnx's reference evaluator, OpenCV DNN on the standard-ops
form (OP_SPEC.md's 1e-4 of a row's largest |logit|), and the fused kernel's host build
(tests/test_nnl_fused.py).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from edgehebb.errors import EdgehebbError
from edgehebb.nnl.model import load_model, save_model
from edgehebb.nnl import (EPS, NNLConv, NNLNet, colour_normalise, spec_from_dict,
                          with_options)
from edgehebb.nnl.layers import _conv_ieee
from edgehebb.deploy.op import NAME as OP_NAME, SIGMA_VERSION as SIGMA_OP_VERSION
from edgehebb.deploy.onnx_export import build_model_proto, export_onnx
from edgehebb.deploy.onnx_op import op_function
from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from tests.test_onnx_export import CLASSES, SPEC, assert_matches, patch_filters, ready, run
from tests.test_train import bank_dir  # noqa: F401 (a fixture)

# sigma beside the test images' patch norms: |v| of a 3x3x3 patch of these gratings is ~1.5-4, and the
# padded block's border patches are partly black, so both the saturating and the linear regime occur
OPTIONS = with_options(SPEC, colour_norm="gray-world")
OPTIONS = dataclasses.replace(OPTIONS, blocks=(dataclasses.replace(OPTIONS.blocks[0], sigma=0.5),
                                               dataclasses.replace(OPTIONS.blocks[1], sigma=1.5)))


@pytest.fixture
def x(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def banks(x):
    return patch_filters(x, SPEC, seed=1)


@pytest.fixture
def net(x, banks) -> NNLNet:
    return ready(NNLNet(OPTIONS, banks), x)


# ----------------------------------------------------------------------------- off: today's op

def test_off_is_todays_op_bit_for_bit(x, banks):
    explicit = spec_from_dict({**SPEC.to_dict(), "colour_norm": "none",
                               "blocks": [{**b, "sigma": 0} for b in SPEC.to_dict()["blocks"]]})
    assert explicit == SPEC and "sigma" not in str(SPEC.to_dict()) and "colour_norm" not in SPEC.to_dict()
    with torch.no_grad():
        got = NNLNet(explicit, banks).features(x)
        layer = NNLNet(SPEC, banks).blocks[0]
        # the plain norm as it was before the options: dot / (|v| + eps), pool, clip, power
        dot, sq = _conv_ieee(x, layer.weight, 1), _conv_ieee(x * x, layer.ones, 1)
        old = torch.nn.functional.max_pool2d(dot / (sq.sqrt() + EPS), 4, 3).clamp(0, 1).pow(40.0)
    assert torch.equal(got[:, :old[0].numel()], old.flatten(1))
    model = build_model_proto(ready(NNLNet(explicit, banks), x), CLASSES)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgehebb.op_version"] == "1" and [f.attribute for f in model.functions] == [op_function().attribute]
    assert not any(a.name == "sigma" for n in model.graph.node for a in n.attribute)
    assert not any(n.name.startswith("colour_norm") for n in model.graph.node)


# ----------------------------------------------------------------------------- on: the formulas

@pytest.mark.parametrize("center", [False, True])
def test_sigma_is_the_semi_saturated_norm_per_patch(x, center):
    g = torch.Generator().manual_seed(3)
    filters, sigma = torch.randn(5, 3, 3, 3, generator=g), 0.7
    layer = NNLConv(filters, power=1.0, center=center, sigma=sigma).double()
    got = layer.cosines(x[:3].double())
    p = torch.nn.functional.unfold(x[:3].double(), 3)                           # (B, 27, L)
    p = p - p.mean(1, keepdim=True) if center else p
    m = layer.weight.flatten(1)
    want = (m @ p) / ((p * p).sum(1, keepdim=True) + sigma ** 2).sqrt().add(EPS)
    torch.testing.assert_close(got.flatten(2), want, rtol=1e-12, atol=1e-12)
    # a black patch stays at 0 and a faint one is damped, where the plain norm makes it a full cosine
    assert not layer.cosines(torch.zeros(1, 3, 3, 3, dtype=torch.float64)).any()
    faint = 0.01 * filters[:1].double()                      # a textured patch (not flat: centring keeps it)
    plain = NNLConv(filters, power=1.0, center=center).double()
    assert plain.cosines(faint).abs().max() > 0.5           # scale-free: as strong as the patch at full contrast
    assert layer.cosines(faint).abs().max() < 0.1           # sigma 0.7 against |v| ~ 0.05: damped


def test_gray_world_removes_a_per_channel_gain(x):
    half = x * 0.5                                                              # in [0, 0.5]: no clipping
    gain = torch.tensor([1.8, 1.0, 0.55]).view(1, 3, 1, 1)
    want = colour_normalise(half, "gray-world")
    # the cast is gone; what is left is one factor per image, the gain's effect on the mean grey level
    # (kept on purpose: the patch norm is blind to it, and sigma should see the scene's brightness)
    mu = half.mean(dim=(2, 3), keepdim=True)
    level = (gain * mu).mean(dim=1, keepdim=True) / mu.mean(dim=1, keepdim=True)
    torch.testing.assert_close(colour_normalise(half * gain, "gray-world"), want * level, rtol=2e-6, atol=1e-7)
    # it keeps each image's mean level and makes the channel means equal
    torch.testing.assert_close(want.mean(dim=(1, 2, 3)), half.mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
    means = want.mean(dim=(2, 3))
    torch.testing.assert_close(means, means[:, :1].expand_as(means), rtol=1e-5, atol=0)
    # an empty channel is not blown up, and "none" is the identity
    black_red = x.clone()
    black_red[:, 0] = 0
    assert torch.isfinite(colour_normalise(black_red, "gray-world")).all()
    assert colour_normalise(x, "none") is x


def test_float32_matches_float64_with_the_options(net, x):
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        for scale in (1.0, 0.3):
            got, want = net(x * scale).double(), ref((x * scale).double())
            worst = parity_error(got, want).max()
            assert worst <= PARITY_TOLERANCE, f"images x {scale}: {worst:.2e} of a row's max"


# ----------------------------------------------------------------------------- on: every ONNX client

def test_every_onnx_client_matches_torch_with_the_options(net, x, one_opencv_thread):
    from onnx.reference import ReferenceEvaluator

    from tests.test_onnx_standard import opencv_run

    custom = build_model_proto(net, CLASSES)
    meta = {p.key: p.value for p in custom.metadata_props}
    assert meta["edgehebb.op_version"] == str(SIGMA_OP_VERSION)
    sigmas = [a.f for n in custom.graph.node if n.op_type == OP_NAME for a in n.attribute if a.name == "sigma"]
    assert sigmas == pytest.approx([0.5, 1.5])
    standard = build_model_proto(net, CLASSES, standard_ops=True)
    feed = x[:6].numpy()
    assert_matches(run(custom, {"images": feed}), net, x[:6], "custom op, onnxruntime")
    assert_matches(run(standard, {"images": feed}), net, x[:6], "standard ops, onnxruntime")
    assert_matches(opencv_run(standard, feed), net, x[:6], "standard ops, OpenCV DNN")
    for form, model in (("custom", custom), ("standard", standard)):
        out = dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, {"images": feed})))
        assert_matches(out, net, x[:6], f"{form}, reference evaluator")


def test_uint8_frames_with_the_options(net, images):
    from edgehebb.deploy.frames import frames_to_tensor
    from tests.test_onnx_export import frames_of

    frames = frames_of(images[:4], 24, 40, seed=4)
    kwargs = dict(preprocess="uint8-nhwc", channel_order="bgr", fit="center-crop", frame_size=(24, 40))
    want = frames_to_tensor(frames, (16, 16), channel_order="bgr", fit="center-crop")
    for standard in (False, True):
        model = build_model_proto(net, CLASSES, standard_ops=standard, **kwargs)
        assert_matches(run(model, {"frames": frames}), net, want, f"frames, standard_ops={standard}")


def test_options_round_trip_through_the_model_directory_runtime_and_tensorrt_pins(net, x, images, tmp_path):
    from edgehebb.deploy.runtime import Runtime
    from edgehebb.deploy.tensorrt_plan import custom_nodes

    save_model(tmp_path / "m", net, CLASSES)
    loaded, config = load_model(tmp_path / "m")
    assert loaded.spec == OPTIONS and config["spec"]["colour_norm"] == "gray-world"
    assert [b["sigma"] for b in config["spec"]["blocks"]] == [0.5, 1.5]
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    path = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    import onnx
    assert custom_nodes(onnx.load(str(path))) == [("block0", OP_NAME), ("block1", OP_NAME)]
    got = Runtime(path, device="cpu").predict(images[:4], features=True)
    with torch.no_grad():
        ref = copy.deepcopy(net).double()
        feats = ref.features(x[:4].double())
        probs = torch.softmax(ref.classify(feats), 1)
    torch.testing.assert_close(torch.from_numpy(got.probabilities).double(), probs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.features).double(), feats, rtol=1e-4,
                               atol=1e-6 * float(feats.abs().max()))


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("change, message", [
    (lambda d: d["blocks"][0].update(sigma=-0.1), "blocks[0].sigma must be a number >= 0 (0: the plain patch norm), "
                                                  "got -0.1"),
    (lambda d: d["blocks"][0].update(sigma="0.1"), "got '0.1'"),
    (lambda d: d["blocks"][0].update(sigma=float("nan")), "got nan"),
    (lambda d: d["blocks"][0].update(sigma=0.1, norm=False), "sigma 0.1 needs the patch norm"),
    (lambda d: d.update(colour_norm="grey"), "'colour_norm' must be one of none, gray-world, got 'grey'"),
    (lambda d: d.update(colour_norm="gray-world", input=[1, 16, 16]), "needs 3-channel (RGB) input"),
])
def test_bad_values_are_one_line_errors_naming_them(change, message):
    d = copy.deepcopy(SPEC.to_dict())
    change(d)
    with pytest.raises(EdgehebbError) as e:
        spec_from_dict(d, "s.json")
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EdgehebbError, match="got -1"):
        NNLConv(torch.randn(2, 3, 3, 3), 2.0, sigma=-1)
    with pytest.raises(EdgehebbError, match="got 'white-patch'"):
        with_options(SPEC, colour_norm="white-patch")


# ----------------------------------------------------------------------------- edgehebb train

def test_cli_train_sets_the_options_over_the_spec(bank_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from edgehebb.cli import cli
    from edgehebb.nnl import COLOUR_NORMS
    from tests.test_train import SPEC as TRAIN_SPEC, _grating_folder

    data = _grating_folder(tmp_path / "data", 60)
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(TRAIN_SPEC))
    args = ["train", "--spec", str(spec_file), "--data", str(data), "--filters-from", str(bank_dir), "--epochs", "2",
            "--device", "cpu", "--no-cache", "--val-fraction", "0.2", "--threads", "1"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "m"), "--sigma", "0.25", "--colour-norm", "gray-world"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["spec"]["colour_norm"] == "gray-world" and config["spec"]["blocks"][0]["sigma"] == 0.25
    assert load_model(tmp_path / "m")[0].blocks[0].sigma == 0.25
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "n"), "--sigma", "-1"])
    assert res.exit_code != 0 and "-1" in res.output
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "n"), "--colour-norm", "grey"])
    assert res.exit_code != 0 and "'grey'" in res.output
    option = next(p for p in cli.commands["train"].params if p.name == "colour_norm")
    assert tuple(option.type.choices) == COLOUR_NORMS


def test_configs_round_trip_and_write_option_keys_only_when_set():
    """The shipped model (gray-world since 2026-12-01) reads back its own spec; a spec without the options
    (the paper's fig2_left) writes no option key, so files from before the options read as they did."""
    import json

    from edgehebb.nnl.model import resolve_model
    from edgehebb.nnl import load_spec, spec_from_dict

    net, config = load_model("fig2_left-cifar10")
    on_disk = json.loads((resolve_model("fig2_left-cifar10") / "config.json").read_text())
    assert net.spec.to_dict() == on_disk["spec"] and net.spec.colour_norm == "gray-world"
    assert all(b.sigma == 0.0 for b in net.blocks)
    plain = load_spec("fig2_left").to_dict()
    assert "colour_norm" not in plain and all("sigma" not in b for b in plain["blocks"])
    assert spec_from_dict(plain).to_dict() == plain
