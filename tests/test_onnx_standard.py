"""The standard-ops export (issue 14): plain ONNX that foreign clients run, and static shapes in both exports.

Foreign clients: OpenCV DNN (``cv2.dnn``, which ignores model-local functions and refuses the custom
node) on the standard-ops file, and onnx's reference evaluator on both files. Each is compared with
the torch network evaluated in float64, as in test_onnx_export: logits within 1e-4 of each row's
max |logit| (OP_SPEC.md's acceptance), on CIFAR-10 test images when EDGEHEBB_DATA is set and on
random images otherwise.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from edgehebb.errors import EdgehebbError
from edgehebb.deploy.frames import frames_to_tensor
from edgehebb.nnl.model import load_model
from edgehebb.nnl import BlockSpec, ConvNet, NetSpec, NNLNet
from edgehebb.deploy.onnx_export import build_model_proto, export_onnx
from edgehebb.deploy.onnx_standard import standard_ops, uses_custom_ops
from edgehebb.deploy.op import PARITY_TOLERANCE, parity_error
from tests.test_onnx_export import CLASSES, SPEC, assert_matches, frames_of, patch_filters, ready, run

SHIPPED = "fig2_left-cifar10"


pytestmark = pytest.mark.usefixtures("one_opencv_thread")   # conftest: the machine is shared


@pytest.fixture
def x(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def net(x) -> NNLNet:
    return ready(NNLNet(SPEC, patch_filters(x, SPEC, seed=1)), x)


def opencv_run(model: onnx.ModelProto, feed: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of ``model`` through cv2.dnn (its default engine, as a camera pipeline would load it)."""
    net = cv2.dnn.readNetFromONNX(np.frombuffer(model.SerializeToString(), np.uint8))
    net.setInput(feed)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, net.forward(names)))


def reference_run(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feed)))


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def assert_static_but_batch(model: onnx.ModelProto, what: str) -> None:
    """Every activation of the main graph is typed, with every dimension static but a leading 'batch'."""
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    for node in model.graph.node:
        for name in node.output:
            assert name in typed, f"{what}: no shape for {name} ({node.op_type})"
            shape = dims(typed[name])
            assert all(isinstance(d, int) and d > 0 for d in shape[1:]), f"{what}: {name} has shape {shape}"
            assert shape[:1] in ([], ["batch"]) or isinstance(shape[0], int), f"{what}: {name} has shape {shape}"


# ----------------------------------------------------------------------------- structure

FRAMES = dict(preprocess="uint8-nhwc", frame_size=(24, 40), fit="center-crop", channel_order="bgr")


@pytest.mark.parametrize("kwargs", [{}, FRAMES], ids=["images", "frames"])
def test_standard_ops_file_is_plain_onnx_with_the_same_contract(net, kwargs):
    custom = build_model_proto(net, CLASSES, **kwargs)
    model = build_model_proto(net, CLASSES, standard_ops=True, **kwargs)
    onnx.checker.check_model(model, full_check=True)
    assert uses_custom_ops(custom) and not uses_custom_ops(model)
    assert not model.functions and {o.domain for o in model.opset_import} == {""}
    assert {o.version for o in model.opset_import} == {17}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert "Constant" not in {n.op_type for n in model.graph.node}, "constants are folded into initializers"
    # one integer type: OpenCV refused the inlined graph's int32 value_int constants beside int64 shapes
    ints = {onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.INT16, onnx.TensorProto.INT8}
    int_types = {t.data_type for t in model.graph.initializer if t.data_type in ints}
    int_types |= {v.type.tensor_type.elem_type for v in model.graph.value_info if v.type.tensor_type.elem_type in ints}
    assert int_types <= {onnx.TensorProto.INT64}
    assert_static_but_batch(model, "standard ops")
    # the same inputs, outputs and metadata (but the one key that says which form this is)
    assert [(i.name, dims(i)) for i in model.graph.input] == [(i.name, dims(i)) for i in custom.graph.input]
    assert [(o.name, dims(o)) for o in model.graph.output] == [(o.name, dims(o)) for o in custom.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    custom_meta = {p.key: p.value for p in custom.metadata_props}
    assert (meta.pop("edgehebb.ops"), custom_meta.pop("edgehebb.ops")) == ("standard", "custom")
    assert meta == custom_meta and json.loads(meta["edgehebb.classes"]) == CLASSES
    assert model.producer_name == "edgehebb" and "Standard ONNX ops only" in model.doc_string


def test_exact_no_ops_are_dropped(net):
    # block 0 has no padding and centres (shift 0.5, Mul by center = 1); block 1 pads and does not centre
    model = build_model_proto(net, CLASSES, standard_ops=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Pad") == 1, "a Pad by zeros is dropped, the padded block keeps its own"
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Mul", "Add", "Sub") and n.input[1] in consts and consts[n.input[1]].size == 1:
            assert float(consts[n.input[1]].reshape(())) != (1.0 if n.op_type == "Mul" else 0.0), n


def test_standard_ops_needs_a_fixed_frame_size(net):
    with pytest.raises(EdgehebbError, match="need a frame size"):
        build_model_proto(net, CLASSES, preprocess="uint8-nhwc", standard_ops=True)


@pytest.mark.parametrize("kwargs", [{}, FRAMES, dict(preprocess="uint8-nhwc", frame_size=(16, 16))],
                         ids=["images", "frames 24x40", "frames 16x16"])
def test_default_export_carries_static_shapes(net, kwargs):
    # shape inference alone stops at the custom node ([batch, 8, ?, ?]): the exporter writes them in
    model = build_model_proto(net, CLASSES, **kwargs)
    onnx.checker.check_model(model, full_check=True)
    assert_static_but_batch(model, "custom op")
    shapes = {v.name: dims(v) for v in model.graph.value_info}
    assert shapes["block0"] == ["batch", 8, 4, 4] and shapes["block1"] == ["batch", 8, 3, 3]


def test_default_export_with_dynamic_frames_has_static_shapes_after_the_resize(net):
    model = build_model_proto(net, CLASSES, preprocess="uint8-nhwc", fit="center-crop")
    shapes = {v.name: dims(v) for v in model.graph.value_info}
    assert shapes["frames.resized"] == ["batch", 3, 16, 16]
    assert shapes["block0"] == ["batch", 8, 4, 4] and shapes["block1"] == ["batch", 8, 3, 3]


# ----------------------------------------------------------------------------- numbers, synthetic

def test_every_client_matches_torch_on_images(net, x):
    custom = build_model_proto(net, CLASSES)
    model = build_model_proto(net, CLASSES, standard_ops=True)
    feed = x[:6].numpy()
    assert_matches(run(model, {"images": feed}), net, x[:6], "standard ops, onnxruntime")
    assert_matches(opencv_run(model, feed), net, x[:6], "standard ops, OpenCV DNN")
    assert_matches(reference_run(model, {"images": feed}), net, x[:6], "standard ops, reference evaluator")
    assert_matches(reference_run(custom, {"images": feed}), net, x[:6], "custom op, reference evaluator")


def test_every_client_matches_torch_on_frames(net, images):
    frames = frames_of(images[:5], 24, 40, seed=4)
    model = build_model_proto(net, CLASSES, standard_ops=True, **FRAMES)
    want = frames_to_tensor(frames, (16, 16), channel_order="bgr", fit="center-crop")
    assert_matches(run(model, {"frames": frames}), net, want, "frames, onnxruntime")
    assert_matches(opencv_run(model, frames), net, want, "frames, OpenCV DNN")


@pytest.mark.parametrize("patch_norm", [False, True])
def test_conv_kind_and_norm_false_blocks(x, patch_norm):
    torch.manual_seed(3)
    conv = ready(ConvNet(SPEC, power=2.0, patch_norm=patch_norm), x)
    spec = NetSpec("mix", (BlockSpec(kernel=3, filters=6, power=40.0, pool=2, pool_stride=2, padding=2),
                           BlockSpec(kernel=3, filters=6, power=3.0, pool=3, pool_stride=3, norm=False)),
                   input=(3, 16, 16), classes=4)
    mixed = ready(NNLNet(spec, patch_filters(x, spec, seed=2)), x)
    for what, net in (("conv", conv), ("mixed", mixed)):
        model = build_model_proto(net, CLASSES, standard_ops=True)
        assert not uses_custom_ops(model)
        assert_matches(opencv_run(model, x[:6].numpy()), net, x[:6], f"{what}, OpenCV DNN")


@pytest.mark.parametrize("opset", [18, 21])
def test_newer_opsets(net, x, opset):
    model = build_model_proto(net, CLASSES, opset=opset, standard_ops=True)
    onnx.checker.check_model(model, full_check=True)
    assert {o.version for o in model.opset_import} == {opset}
    assert_matches(opencv_run(model, x[:4].numpy()), net, x[:4], f"opset {opset}, OpenCV DNN")


def test_standard_ops_of_a_custom_file_equals_the_standard_export(net):
    # Runtime's OpenCV backend converts custom-op files in memory: the same graph as --standard-ops
    direct = build_model_proto(net, CLASSES, standard_ops=True)
    converted = standard_ops(build_model_proto(net, CLASSES))
    assert list(converted.graph.node) == list(direct.graph.node)   # ops, inputs, attributes and outputs
    assert [t.name for t in converted.graph.initializer] == [t.name for t in direct.graph.initializer]
    for a, b in zip(converted.graph.initializer, direct.graph.initializer, strict=True):
        assert a.data_type == b.data_type and list(a.dims) == list(b.dims), a.name
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)), a.name


# ----------------------------------------------------------------------------- the shipped model, real images

@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, str]:
    """200 CIFAR-10 test images (20 per class) with EDGEHEBB_DATA, else 200 random ones; uint8 NHWC."""
    root = os.environ.get("EDGEHEBB_DATA")
    if root and Path(root).is_dir():
        from edgehebb.data import load_split

        return np.asarray(load_split(root, "test", limit=200, progress=False).x), "CIFAR-10 test"
    return np.random.default_rng(7).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), "random"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped model, its float64 twin, and both exports."""
    net, _ = load_model(SHIPPED)
    out = tmp_path_factory.mktemp("shipped")
    custom = onnx.load(export_onnx(SHIPPED, out / "custom.onnx"))
    standard = onnx.load(export_onnx(SHIPPED, out / "standard.onnx", standard_ops=True))
    return copy.deepcopy(net).double(), custom, standard


def check_logits(got: np.ndarray, ref: torch.Tensor, what: str) -> None:
    err = parity_error(got, ref)
    assert err.max() <= PARITY_TOLERANCE, f"{what}: logits off by {err.max():.3g} of the row's max |logit| (row {err.argmax()})"
    agree = int((torch.from_numpy(got).argmax(1) == ref.argmax(1)).sum())
    assert agree >= 0.999 * len(ref), f"{what}: top-1 agrees on {agree} of {len(ref)}"


def test_opencv_runs_the_shipped_model_like_torch(shipped, test_images):
    """A pipeline with only OpenCV: the --standard-ops file through cv2.dnn, 200 images."""
    ref_net, _, standard = shipped
    frames, source = test_images
    x = frames_to_tensor(frames)
    with torch.no_grad():
        ref = ref_net(x.double())
    got = opencv_run(standard, x.numpy())["logits"]
    check_logits(got, ref, f"OpenCV DNN {cv2.__version__}, {source} images")


@pytest.mark.parametrize("form", ["custom", "standard"])
def test_reference_evaluator_runs_both_exports_of_the_shipped_model(shipped, test_images, form):
    """onnx's own evaluator (slow: 10 images, one per class on CIFAR-10) on both files."""
    ref_net, custom, standard = shipped
    frames, source = test_images
    x = frames_to_tensor(frames[::20])
    with torch.no_grad():
        ref = ref_net(x.double())
    got = reference_run(custom if form == "custom" else standard, {"images": x.numpy()})["logits"]
    check_logits(got, ref, f"reference evaluator, {form} ops, {source} images")

