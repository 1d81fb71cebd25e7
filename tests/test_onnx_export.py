"""ONNX export: the file checks, carries the custom op with its body, and ONNX Runtime (CPU) matches torch.

Reference. ONNX Runtime is compared with the torch network evaluated in float64 (the same nnl.py
code, ``net.double()``). A float32 evaluation of each patch's variance as s2 - s1^2 / N cancels on
low-contrast patches (off from float64 by up to 0.7 of a row's largest logit on 1,000 CIFAR-10 test
images, 0.4% of top-1 flipped), which is why nnl.py takes those sums in float64 and the exported op
computes the variance in two passes (export/OP_SPEC.md); the op stays within ~2e-5 of float64.

Tolerances. Logits: |onnx - torch| <= 1e-4 * max_j |torch_j| per row (measured worst ~2e-5), and the
same top-1. Features (pooled cos^n, spanning many orders of magnitude): rtol 1e-4 plus an atol of 1e-6
of the batch's largest feature. Probabilities: rtol 1e-4, atol 1e-6.
"""

from __future__ import annotations

import copy
import json
import sys
import types

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgehebb.cli.export import export, parse_batch, parse_frame_size
from edgehebb.errors import EdgehebbError
from edgehebb.deploy.frames import crop_box, frames_to_tensor
from edgehebb.nnl.model import save_model, shipped_models
from edgehebb.nnl import BlockSpec, ConvNet, NetSpec, NNLNet, load_spec
from edgehebb.deploy.op import DOMAIN as OP_DOMAIN, NAME as OP_NAME
from edgehebb.deploy.onnx_export import build_model_proto, export_onnx
from edgehebb.nnl.train import fit_standardiser
from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from tests.conftest import assert_close

SPEC = NetSpec("tiny", (BlockSpec(kernel=3, filters=8, power=40.0, pool=4, pool_stride=3),
                        BlockSpec(kernel=4, filters=8, power=10.0, pool=3, pool_stride=2, stride=2, padding=1,
                                  center=False)),
               input=(3, 16, 16), classes=4)
CLASSES = ["cat", "dog", "frog", "ship"]


def patch_filters(x: torch.Tensor, spec: NetSpec, seed: int) -> list[torch.Tensor]:
    """Filters cut from the images plus noise: data-like, so cosines reach ~1 as learned filters do."""
    g = torch.Generator().manual_seed(seed)
    banks = []
    for b in spec.blocks:
        n, c, h, w = x.shape
        i = torch.randint(0, n, (b.filters,), generator=g)
        r = torch.randint(0, h - b.kernel + 1, (b.filters,), generator=g)
        s = torch.randint(0, w - b.kernel + 1, (b.filters,), generator=g)
        bank = torch.stack([x[a, :, p:p + b.kernel, q:q + b.kernel] for a, p, q in zip(i, r, s)])
        banks.append(bank - bank.mean(dim=(1, 2, 3), keepdim=True) + 0.05 * torch.randn(bank.shape, generator=g))
    return banks


def ready(net, x: torch.Tensor, seed: int = 0):
    """Standardiser fitted on ``x``'s features (as training does) and a seeded random head."""
    torch.manual_seed(seed)
    net.head.reset_parameters()
    with torch.no_grad():
        fit_standardiser(net, net.features(x).numpy())
    return net.eval()


@pytest.fixture
def x(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def net(x) -> NNLNet:
    return ready(NNLNet(SPEC, patch_filters(x, SPEC, seed=1)), x)


def session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(model, feed: dict) -> dict[str, np.ndarray]:
    s = session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


def assert_matches(out: dict, net, x: torch.Tensor, what: str, rel: float = PARITY_TOLERANCE) -> None:
    """Logits within ``rel`` of each row's max |logit|, same top-1, features and probabilities close."""
    with torch.no_grad():
        ref = copy.deepcopy(net).double()   # the float64 evaluation of the torch reference: see the module doc
        feats = ref.features(x.double())
        logits = ref.classify(feats)
    err = parity_error(out["logits"], logits)
    assert err.max() <= rel, f"{what}: logits off by {err.max():.3g} of the row's max |logit| (row {err.argmax()})"
    assert (out["logits"].argmax(1) == logits.argmax(1).numpy()).all(), f"{what}: top-1 differs"
    assert_close(out["probabilities"], torch.softmax(logits, 1), rtol=1e-4, atol=1e-6, what=f"{what}: probabilities")
    assert_close(out["features"], feats, rtol=1e-4, atol=1e-6 * float(feats.abs().max()), what=f"{what}: features")


# ----------------------------------------------------------------------------- structure

def test_export_is_valid_and_carries_the_custom_op(net, tmp_path):
    save_model(tmp_path / "m", net, CLASSES)
    path = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)

    custom = [n for n in model.graph.node if n.domain == OP_DOMAIN]
    assert [n.op_type for n in custom] == [OP_NAME, OP_NAME]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[1].attribute}
    assert attrs == {"strides": [2, 2], "padding": 1, "pool_shape": [3, 3], "pool_strides": [2, 2],
                     "power": 10.0, "eps": pytest.approx(1e-4), "center": 0}
    (fn,) = model.functions
    assert (fn.domain, fn.name, list(fn.input), list(fn.output)) == (OP_DOMAIN, OP_NAME, ["X", "M"], ["Y"])
    assert all(n.domain in ("", "ai.onnx") for n in fn.node), "the body must use standard ops only"
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 17, OP_DOMAIN: 1}
    assert {o.domain: o.version for o in fn.opset_import} == {"": opsets[""]}

    assert model.producer_name == "edgehebb"
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edgehebb.classes"]) == CLASSES
    assert (meta["edgehebb.op_domain"], meta["edgehebb.op_version"], meta["edgehebb.kind"]) == (OP_DOMAIN, "1", "nnl")
    assert json.loads(meta["edgehebb.spec"]) == SPEC.to_dict()
    assert json.loads(meta["edgehebb.input"])["name"] == "images"
    assert json.loads(meta["edgehebb.preprocess"]) == {"mode": "none"}
    assert meta["edgehebb.version"]
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "features"]


def test_function_body_sizes_fold_to_constants(net):
    # TensorRT's parser needs the identity kernel's size (EyeLike) and the reshaped filters' channel
    # count (Conv with computed weights) while it parses: N = C*W*W must fold from Shape(M)
    # arithmetic, as ONNX shape inference with data propagation does here (ReduceProd did not)
    from onnx.inliner import inline_local_functions

    model = inline_local_functions(build_model_proto(net, CLASSES))
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)

    def dims(prefix):
        return sorted(tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
                      for v in model.graph.value_info if v.name.split("__")[0] == prefix)

    ns = [3 * b.kernel ** 2 for b in SPEC.blocks]
    assert dims("eye") == sorted((n, n) for n in ns)
    assert dims("Mflat") == sorted((b.filters, 3 * b.kernel ** 2, 1, 1) for b in SPEC.blocks)


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_torch_at_any_batch(net, x, batch):
    model = build_model_proto(net, CLASSES)  # one file, batch dynamic
    assert_matches(run(model, {"images": x[:batch].numpy()}), net, x[:batch], f"batch {batch}")


@pytest.mark.parametrize("opset", [18, 21])
def test_newer_opsets(net, x, opset):
    model = build_model_proto(net, CLASSES, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert_matches(run(model, {"images": x[:4].numpy()}), net, x[:4], f"opset {opset}")


def test_unpadded_centred_and_norm_false_blocks(x):
    """center/padding combinations, and the norm=False ablation (standard ops, no custom node)."""
    spec = NetSpec("mix", (BlockSpec(kernel=3, filters=6, power=40.0, pool=2, pool_stride=2, padding=2),
                           BlockSpec(kernel=4, filters=6, power=1.0, pool=5, pool_stride=5, center=False),
                           BlockSpec(kernel=3, filters=6, power=3.0, pool=3, pool_stride=3, norm=False)),
                   input=(3, 16, 16), classes=4)
    net = ready(NNLNet(spec, patch_filters(x, spec, seed=2)), x)
    model = build_model_proto(net, CLASSES)
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node if n.domain == OP_DOMAIN] == ["block0", "block1"]
    assert_matches(run(model, {"images": x[:8].numpy()}), net, x[:8], "mixed blocks")


@pytest.mark.parametrize("patch_norm", [False, True])
def test_conv_kind(x, tmp_path, patch_norm):
    torch.manual_seed(3)
    net = ready(ConvNet(SPEC, power=2.0, patch_norm=patch_norm), x)
    save_model(tmp_path / "conv", net, CLASSES)
    model = onnx.load(export_onnx(tmp_path / "conv", tmp_path / "conv.onnx"))
    assert any(n.domain == OP_DOMAIN for n in model.graph.node) == patch_norm
    assert {p.key: p.value for p in model.metadata_props}["edgehebb.kind"] == "conv"
    assert_matches(run(model, {"images": x[:8].numpy()}), net, x[:8], f"conv patch_norm={patch_norm}")


# ----------------------------------------------------------------------------- uint8 frames

def frames_of(images: np.ndarray, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 frames of h x w: the images tiled (real structure at every scale), plus noise."""
    rng = np.random.default_rng(seed)
    reps = (1, -(-h // images.shape[1]), -(-w // images.shape[2]), 1)
    tiled = np.tile(images, reps)[:, :h, :w].astype(np.int16) + rng.integers(-8, 9, (len(images), h, w, 3))
    return np.clip(tiled, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fit, order, fixed, hw", [
    ("resize", "rgb", False, (24, 40)),           # downscale, aspect changes
    ("center-crop", "bgr", False, (24, 40)),      # wide frame: columns cropped
    ("center-crop", "rgb", True, (30, 20)),       # tall frame, size fixed at export
    ("resize", "bgr", True, (10, 12)),            # upscale: edge clamping of half-pixel sampling
    ("center-crop", "rgb", False, (16, 16)),      # already the model's size: crop and resize are no-ops
])
def test_uint8_frames_match_frames_to_tensor_and_torch(net, images, fit, order, fixed, hw):
    frames = frames_of(images[:6], *hw, seed=4)
    model = build_model_proto(net, CLASSES, preprocess="uint8-nhwc", channel_order=order, fit=fit,
                              frame_size=hw if fixed else None)
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, inp.type.tensor_type.elem_type) == ("frames", onnx.TensorProto.UINT8)
    assert dims == ["batch", *(hw if fixed else ("height", "width")), 3]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edgehebb.preprocess"])["channel_order"] == order

    t = frames_to_tensor(frames, size=(16, 16), channel_order=order, fit=fit)
    assert t.dtype == torch.float32 and tuple(t.shape) == (6, 3, 16, 16)
    assert_matches(run(model, {"frames": frames}), net, t, f"{fit} {order} {hw}")


def test_dynamic_frames_take_any_size_in_one_session(net, images):
    s = session(build_model_proto(net, CLASSES, preprocess="uint8-nhwc", fit="center-crop"))
    for hw in [(20, 33), (48, 17), (16, 16)]:
        frames = frames_of(images[:3], *hw, seed=5)
        out = dict(zip(["logits", "probabilities", "features"], s.run(None, {"frames": frames})))
        assert_matches(out, net, frames_to_tensor(frames, (16, 16), fit="center-crop"), f"frames {hw}")


def test_frames_to_tensor_inputs_and_crop_box():
    rng = np.random.default_rng(6)
    frame = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    a = frames_to_tensor(frame)                                     # one frame, numpy, size kept
    b = frames_to_tensor(torch.from_numpy(frame[None]), channel_order="bgr")
    assert tuple(a.shape) == (1, 3, 9, 12)
    assert torch.equal(a, b.flip(1)) and torch.equal(a[0, :, 2, 3], torch.from_numpy(frame[2, 3]).float() / 255)
    assert crop_box(9, 12, (16, 16)) == (0, 1, 9, 9)
    assert crop_box(480, 640, (32, 32)) == (0, 80, 480, 480)
    assert crop_box(640, 480, (16, 32)) == (200, 0, 240, 480)
    with pytest.raises(EdgehebbError, match="uint8"):
        frames_to_tensor(frame.astype(np.float32))
    with pytest.raises(EdgehebbError, match="'crop'"):
        frames_to_tensor(frame, (4, 4), fit="crop")
    with pytest.raises(EdgehebbError, match="a 1x1 frame is too small to centre-crop to the model's 24:40 aspect"):
        frames_to_tensor(frame[:1, :1], (24, 40), fit="center-crop")   # the crop would have 0 rows


# ----------------------------------------------------------------------------- bad input

def test_bad_arguments_name_the_value(net, tmp_path):
    with pytest.raises(EdgehebbError, match="'bogus'"):
        build_model_proto(net, CLASSES, preprocess="bogus")
    with pytest.raises(EdgehebbError, match="'yuv'"):
        build_model_proto(net, CLASSES, preprocess="uint8-nhwc", channel_order="yuv")
    with pytest.raises(EdgehebbError, match="opset 11"):
        build_model_proto(net, CLASSES, opset=11)
    with pytest.raises(EdgehebbError, match="uint8-nhwc"):
        build_model_proto(net, CLASSES, channel_order="bgr")       # frame options without frames
    with pytest.raises(EdgehebbError, match="-3x4"):
        build_model_proto(net, CLASSES, preprocess="uint8-nhwc", frame_size=(-3, 4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgehebbError, match="empty"):
        export_onnx(tmp_path / "empty", tmp_path / "x.onnx")
    with pytest.raises(EdgehebbError, match="no-such-model"):
        export_onnx("no-such-model", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("text", ["1,2", "4,2,8", "0,1,1", "a,b,c", "1,2,3,4", ""])
def test_parse_batch_rejects(text):
    with pytest.raises(EdgehebbError, match=repr(text).replace("(", r"\(")):
        parse_batch(text)


def test_parse_helpers_accept():
    assert parse_batch("1,1,8") == (1, 1, 8) and parse_batch(" 2, 4 ,4") == (2, 4, 4)
    assert parse_frame_size("480x640") == (480, 640) and parse_frame_size(None) is None
    for bad in ("480", "0x640", "480x", "axb"):
        with pytest.raises(EdgehebbError, match=bad):
            parse_frame_size(bad)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def cli():
    group = click.Group("edgehebb")
    group.add_command(export)
    return group


def test_cli_export(cli, net, tmp_path, monkeypatch):
    save_model(tmp_path / "m", net, CLASSES)
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx"),
                                   "--preprocess", "uint8-nhwc", "--frame-size", "24x32", "--fit", "center-crop",
                                   "--channel-order", "bgr", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["onnx"] == str(tmp_path / "m.onnx") and info["bytes"] > 0 and "engine" not in info
    model = onnx.load(tmp_path / "m.onnx")
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [24, 32, 3]

    # --trt: the real build_engine, on the ONNX file export has just written, over a stand-in for TensorRT
    # (tests/test_tensorrt_engine.py: TensorRT's documented calls with a fixed parsed network; there is no
    # TensorRT here). What it can check: the CLI's options reach the builder, and the sidecar beside the
    # engine carries this ONNX file's hash, metadata and classes
    import hashlib

    from edgehebb.deploy.tensorrt_plan import sidecar_path
    from tests.test_tensorrt_engine import fake_tensorrt

    trt = fake_tensorrt("10.8.0.43", side=True)   # side: a float layer beside the op, so FP16 changes something
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "t.onnx"), "--trt",
                                   "--fp16", "--batch", "1,2,4", "--workspace-mib", "256", "--json"])
    assert res.exit_code == 0, res.output
    engine, onnx_file = tmp_path / "t.engine", tmp_path / "t.onnx"
    shapes = {"min": (1, 3, 16, 16), "opt": (2, 3, 16, 16), "max": (4, 3, 16, 16)}
    assert {("set", trt.BuilderFlag.FP16), ("workspace", 256 << 20),
            ("profile", ("images", shapes["min"], shapes["opt"], shapes["max"]))} <= set(trt.calls)
    info = json.loads(res.stdout)
    assert info["engine"] == str(engine) and engine.read_bytes() == b"PLAN"
    assert info["trt"] == {"sidecar": str(sidecar_path(engine)), "tensorrt": "10.8.0.43", "precision": "fp16",
                           "profile": {k: list(v) for k, v in shapes.items()}, "device": None}
    sidecar = json.loads(sidecar_path(engine).read_text())
    exported = {p.key: p.value for p in onnx.load(onnx_file).metadata_props if p.key.startswith("edgehebb.")}
    assert sidecar["onnx"] == {"file": "t.onnx", "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
                               "metadata": exported}
    assert sidecar["classes"] == CLASSES and sidecar["custom_op"]["nodes"] == ["block0", "block1"]


def test_cli_export_standard_ops(cli, net, tmp_path):
    save_model(tmp_path / "m", net, CLASSES)
    out = tmp_path / "std.onnx"
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(out), "--standard-ops",
                                   "--preprocess", "uint8-nhwc", "--frame-size", "24x32", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ops"] == "standard"
    model = onnx.load(out)
    assert not model.functions and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {p.key: p.value for p in model.metadata_props}["edgehebb.ops"] == "standard"
    # the default stays the custom-op file
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "c.onnx"), "--json"])
    assert json.loads(res.output)["ops"] == "custom"
    assert any(n.domain == OP_DOMAIN for n in onnx.load(tmp_path / "c.onnx").graph.node)

    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "dyn.onnx"),
                                   "--standard-ops", "--preprocess", "uint8-nhwc"])
    assert isinstance(res.exception, EdgehebbError) and "--frame-size" in str(res.exception)
    assert "\n" not in str(res.exception) and not (tmp_path / "dyn.onnx").exists()


def test_cli_export_help_shows_the_real_trt_batch_default(cli):
    import inspect

    from edgehebb.deploy.tensorrt_engine import build_engine

    default = inspect.signature(build_engine).parameters["batch"].default
    help_text = " ".join(CliRunner().invoke(cli, ["export", "--help"]).output.split())
    assert f"[default: {','.join(map(str, default))}]" in help_text
    assert "build_engine" not in help_text


def test_cli_export_trt_refusals_come_before_the_onnx_file(cli, net, tmp_path, monkeypatch):
    save_model(tmp_path / "m", net, CLASSES)
    out = tmp_path / "m.onnx"

    def refused(*args, message):
        res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(out), "--trt", *args])
        assert res.exit_code != 0 and isinstance(res.exception, EdgehebbError), res.output
        assert message in str(res.exception) and "\n" not in str(res.exception)
        assert not out.exists()

    refused("--preprocess", "uint8-nhwc", message="needs --frame-size HxW")
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # as without TensorRT installed
    refused(message="pip install")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.5.0.1"))
    refused("--fp16", message="--fp16 is not available with TensorRT 11.5.0.1")


@pytest.mark.parametrize("args, message", [
    (["--trt", "--batch", "8,4,1"], "'8,4,1'"),
    (["--fp16"], "--fp16 only apply with --trt"),
    (["--preprocess", "uint8-nhwc", "--frame-size", "640"], "'640'"),
    (["--trt", "--fp16", "--standard-ops"], "--fp16 needs the default (custom-op) export"),
])
def test_cli_export_bad_options(cli, net, tmp_path, args, message):
    save_model(tmp_path / "m", net, CLASSES)
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx"), *args])
    assert res.exit_code != 0 and isinstance(res.exception, EdgehebbError), res.output
    assert message in str(res.exception)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_bad_out_is_one_line_before_any_work(cli, net, tmp_path):
    save_model(tmp_path / "m", net, CLASSES)
    (tmp_path / "file").write_text("not a folder")
    for out, message in [(tmp_path / "m.engine", "--out must name a .onnx file"),
                         (tmp_path / "file" / "m.onnx", f"cannot write {tmp_path / 'file' / 'm.onnx'}")]:
        res = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--out", str(out)])
        assert res.exit_code != 0 and isinstance(res.exception, EdgehebbError), res.output
        assert message in str(res.exception) and "\n" not in str(res.exception)


def test_cli_export_unknown_preprocess_is_a_usage_error(cli, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(tmp_path), "--out", str(tmp_path / "m.onnx"), "--preprocess", "rgb8"])
    assert res.exit_code == 2 and "'rgb8'" in res.output


# ----------------------------------------------------------------------------- real data

@pytest.mark.data
@pytest.mark.slow
def test_cifar10_parity_fig2_left(cifar_root, tmp_path):
    """1,000 CIFAR-10 test images through fig. 2 left: ORT logits within 1e-4 of torch's, top-1 >= 99.9% equal."""
    from edgehebb.data import load_split
    from edgehebb.nnl.model import load_model

    test = load_split(cifar_root, "test", limit=1000, cache_dir=tmp_path, progress=False)
    x = torch.from_numpy(np.asarray(test.x)).permute(0, 3, 1, 2).float() / 255
    if "fig2_left-cifar10" in shipped_models():
        net, config = load_model("fig2_left-cifar10")
        classes = config["classes"]
    else:  # no shipped model: image patches as filters, standardiser fitted here, random head
        spec = load_spec("fig2_left")
        net, classes = ready(NNLNet(spec, patch_filters(x, spec, seed=7)), x[:500]), test.classes
    s = session(build_model_proto(net, classes))
    ref_net = copy.deepcopy(net).double()  # float64 reference: see the module doc
    worst, agree = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(x), 200):  # chunks: a 29x29x400 cosine map is 1.3 MB per image
            xb = x[lo:lo + 200]
            ref = ref_net(xb.double())
            got = torch.from_numpy(s.run(["logits"], {"images": xb.numpy()})[0]).double()
            worst = max(worst, float(parity_error(got, ref).max()))
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
    assert worst <= PARITY_TOLERANCE, f"logits off by {worst:.3g} of the row's max |logit|"
    assert agree >= 0.999 * len(x), f"top-1 agrees on {agree} of {len(x)}"
