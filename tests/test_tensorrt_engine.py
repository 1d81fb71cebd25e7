"""TensorRT engine building and running: the version/precision plan, profiles and custom-op layers read
from ONNX, the missing-TensorRT error, and the DeepStream template. Only the `trt` test needs TensorRT."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgehebb.errors import EdgehebbError
from edgehebb.deploy.op import DOMAIN as CUSTOM_DOMAIN, META_CLASSES as CLASSES_KEY, NAME as OP_NAME, load_onnx
from edgehebb.deploy.tensorrt_engine import TrtRunner, build_engine
from edgehebb.deploy.tensorrt_plan import (check_batch, custom_nodes, engine_plan, is_custom_layer, onnx_classes,
                                           onnx_input, parse_version, profile_shapes, sidecar_path)

ROOT = Path(__file__).resolve().parents[1]
DEEPSTREAM = ROOT / "export" / "deepstream"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def tiny_model(input_name="images", dims=("batch", 3, 32, 32), elem_type=TensorProto.FLOAT, blocks=2, check=True):
    """A runnable stand-in for an exported edgehebb model: `blocks` ai.edgehebb nodes (ReLU(x)^2 as a
    model-local function), then flatten, a linear head and softmax, with the classes in the metadata."""
    x = helper.make_tensor_value_info(input_name, elem_type, list(dims))
    nodes, feats = [], []
    src = input_name
    if elem_type == TensorProto.UINT8:      # the `frames` variant: NHWC uint8 -> NCHW float
        nodes += [helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT, name="cast"),
                  helper.make_node("Transpose", ["xf"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw")]
        src = "xt"
    for b in range(blocks):
        nodes.append(helper.make_node("PatchNormPowReLU", [src], [f"p{b}"], domain=CUSTOM_DOMAIN, name=f"block{b}"))
        nodes.append(helper.make_node("Flatten", [f"p{b}"], [f"f{b}"], name=f"flatten{b}"))
        feats.append(f"f{b}")
    nodes += [helper.make_node("Concat", feats, ["features"], axis=1, name="concat"),
              helper.make_node("MatMul", ["features", "W"], ["logits"], name="head"),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax")]
    w = helper.make_tensor("W", TensorProto.FLOAT, [blocks * 3 * 32 * 32, 10],
                           np.random.default_rng(0).normal(0, 0.01, (blocks * 3072, 10)).astype(np.float32).ravel())
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dims[0], k])
               for n, k in (("logits", 10), ("probabilities", 10), ("features", blocks * 3072))]
    graph = helper.make_graph(nodes, "tiny", [x], outputs, initializer=[w])
    body = helper.make_function(
        CUSTOM_DOMAIN, "PatchNormPowReLU", ["x"], ["y"],
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [2.0])),
         helper.make_node("Pow", ["r", "two"], ["y"], name="pow")],
        [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[body],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    helper.set_model_props(model, {CLASSES_KEY: json.dumps(CIFAR10)})
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(tiny_model(), path)
    return path


# --- versions and the build plan ------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("10.7.0.23", (10, 7, 0, 23)), ("11.0", (11, 0, 0, 0)),
                                            ("10.13.3.9.post1", (10, 13, 3, 9)), ("11.5.0b1", (11, 5, 0, 0))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_rejects_garbage():
    with pytest.raises(EdgehebbError, match="version"):
        parse_version("unknown")


@pytest.mark.parametrize("version", ["10.6.0.26", "10.7.0.23", "10.12.0.36", "10.15.1.29", "11.0.0.114", "11.5.0.1"])
def test_fp32_plan_is_strongly_typed_everywhere(version):
    plan = engine_plan(version, fp16=False)
    major = parse_version(version)[0]
    assert plan["precision"] == "fp32" and plan["strongly_typed"]
    # 10.x asks for the flag; 11.x is always strongly typed and only deprecates the flag.
    assert plan["network_flags"] == (["STRONGLY_TYPED"] if major == 10 else [])
    assert not plan["builder_fp16"] and not plan["obey_precision_constraints"] and not plan["fp32_custom_layers"]
    assert plan["disable_tf32"] and plan["notes"] == []


@pytest.mark.parametrize("version", ["10.6.0.26", "10.7.0.23", "10.12.0.36", "10.15.1.29"])
def test_fp16_on_tensorrt_10_uses_weak_typing_with_the_op_pinned_to_fp32(version):
    plan = engine_plan(version, fp16=True)
    assert plan["precision"] == "fp16" and not plan["strongly_typed"] and plan["network_flags"] == []
    assert plan["builder_fp16"] and plan["obey_precision_constraints"] and plan["fp32_custom_layers"]
    deprecated = any("deprecates weak typing" in note for note in plan["notes"])
    assert deprecated == (parse_version(version)[:2] >= (10, 12))


@pytest.mark.parametrize("version", ["11.0.0.114", "11.5.0.1"])
def test_fp16_on_tensorrt_11_is_refused_with_the_reason(version):
    with pytest.raises(EdgehebbError) as e:
        engine_plan(version, fp16=True)
    msg = str(e.value)
    for part in ("strongly typed", "Cast nodes", "stay FP32", "6.1e-5", "0.785"):
        assert part in msg, part


@pytest.mark.parametrize("version, plugin_first, override_flag", [
    ("10.6.0.26", False, False), ("10.7.0.23", True, False), ("10.12.0.36", True, False),
    ("10.15.1.29", True, True), ("11.0.0.114", True, True), ("11.5.0.1", True, True)])
def test_plan_records_plugin_versus_local_function(version, plugin_first, override_flag):
    plan = engine_plan(version, fp16=False)
    assert plan["plugin_replaces_function"] == plugin_first
    assert plan["plugin_override_flag"] == override_flag


def test_tensorrt_9_is_refused():
    with pytest.raises(EdgehebbError, match="TensorRT 10 or newer"):
        engine_plan("9.3.0.1", fp16=False)


# --- what the build reads from the ONNX file ------------------------------------------------------

def test_profile_from_onnx_batch_dimension(tiny_onnx):
    inp = onnx_input(load_onnx(tiny_onnx))
    assert (inp.name, inp.dtype, inp.layout, inp.shape) == ("images", "float32", "NCHW", (None, 3, 32, 32))
    assert profile_shapes(inp, (1, 32, 256)) == {"min": (1, 3, 32, 32), "opt": (32, 3, 32, 32),
                                                 "max": (256, 3, 32, 32)}


def test_fixed_onnx_batch_wins():
    inp = onnx_input(tiny_model(dims=(4, 3, 32, 32)))
    assert profile_shapes(inp, (1, 32, 256)) == {k: (4, 3, 32, 32) for k in ("min", "opt", "max")}


@pytest.mark.parametrize("batch", [(0, 1, 2), (4, 2, 8), (1, 2), (1, 8, 4)])
def test_bad_batch_profiles_are_refused(batch):
    with pytest.raises(EdgehebbError, match="min <= opt <= max"):
        profile_shapes(onnx_input(tiny_model()), batch)


def test_frames_input_needs_a_fixed_frame_size():
    dynamic = onnx_input(tiny_model("frames", ("batch", "height", "width", 3), TensorProto.UINT8))
    with pytest.raises(EdgehebbError, match="dynamic frame size .*--frame-size HxW"):
        profile_shapes(dynamic, (1, 8, 16))
    fixed = onnx_input(tiny_model("frames", ("batch", 32, 32, 3), TensorProto.UINT8))
    assert (fixed.dtype, fixed.layout) == ("uint8", "NHWC")
    assert profile_shapes(fixed, (1, 8, 16))["max"] == (16, 32, 32, 3)


@pytest.mark.parametrize("name, elem_type, match", [("pixels", TensorProto.FLOAT, "'images'"),
                                                    ("images", TensorProto.UINT8, "float32"),
                                                    ("frames", TensorProto.FLOAT, "uint8")])
def test_unexpected_inputs_are_refused(name, elem_type, match):
    with pytest.raises(EdgehebbError, match=match):
        onnx_input(tiny_model(name, elem_type=elem_type, check=False))


def test_custom_nodes_and_classes_come_from_the_onnx_file(tiny_onnx):
    model = load_onnx(tiny_onnx)
    assert custom_nodes(model) == [("block0", "PatchNormPowReLU"), ("block1", "PatchNormPowReLU")]
    assert onnx_classes(model) == CIFAR10
    model.ClearField("metadata_props")
    assert onnx_classes(model) is None


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(EdgehebbError, match="not an ONNX model"):
        load_onnx(bad)
    with pytest.raises(EdgehebbError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_contract_with_the_onnx_exporter():
    """What build_engine reads, from a model edgehebb.deploy.onnx_export actually writes."""
    import torch

    from edgehebb.deploy import onnx_export as export
    from edgehebb.nnl import BlockSpec, NetSpec, NNLNet

    spec = NetSpec("tiny", (BlockSpec(kernel=3, filters=4, power=40.0, pool=4, pool_stride=3),), input=(3, 16, 16),
                   classes=4)
    net = NNLNet(spec, [torch.randn(4, 3, 3, 3)])
    model = export.build_model_proto(net, ["a", "b", "c", "d"])
    assert custom_nodes(model) == [("block0", OP_NAME)]
    assert onnx_classes(model) == ["a", "b", "c", "d"]
    assert profile_shapes(onnx_input(model), (1, 2, 8))["max"] == (8, 3, 16, 16)
    frames = onnx_input(export.build_model_proto(net, ["a", "b", "c", "d"], preprocess="uint8-nhwc"))
    with pytest.raises(EdgehebbError, match="--frame-size"):
        profile_shapes(frames, (1, 2, 8))


NODES = [("block0", "PatchNormPowReLU"), ("block1", "PatchNormPowReLU")]


@pytest.mark.parametrize("name, metadata, expected", [
    ("block0", "", True),                                                   # a plugin replacing the function
    ("block1_2", "", True),                                                 # parser's unique-name suffix
    # inlined body: layers named after the (unnamed) body nodes, "node_of_<output>"; the caller is in the metadata
    ("node_of_Y_1", "[ONNX Layer: node_of_Y | block1 (PatchNormPowReLU)]", True),   # TensorRT >= 10.6
    ("node_of_cos", "[ONNX Layer: node_of_cos | Local Function: PatchNormPowReLU]", True),   # before 10.6
    ("block0.flat", "[ONNX Layer: block0.flat]", False),
    ("block10", "[ONNX Layer: block10]", False),
])
def test_custom_layer_recognition(name, metadata, expected):
    assert is_custom_layer(name, metadata, NODES) == expected


def test_check_batch_against_the_profile():
    assert check_batch((7, 3, 32, 32), (3, 32, 32), 1, 256, "input") == 7
    with pytest.raises(EdgehebbError, match=r"outside the engine's profile \(1..256\)"):
        check_batch((257, 3, 32, 32), (3, 32, 32), 1, 256, "input")
    with pytest.raises(EdgehebbError, match=r"must have shape \(N, 3, 32, 32\)"):
        check_batch((2, 32, 32, 3), (3, 32, 32), 1, 256, "input")


def test_sidecar_sits_beside_the_engine(tmp_path):
    assert sidecar_path(tmp_path / "m.engine") == tmp_path / "m.engine.json"


# --- without TensorRT -----------------------------------------------------------------------------

@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed")
def test_missing_tensorrt_is_one_clear_error(tiny_onnx, tmp_path):
    with pytest.raises(EdgehebbError) as e:
        build_engine(tiny_onnx, tmp_path / "model.engine")
    assert "tensorrt is not installed" in str(e.value)
    assert "pip install 'edgehebb[gpu]'" in str(e.value)
    with pytest.raises(EdgehebbError, match=r"edgehebb\[gpu\]"):
        TrtRunner(tmp_path / "model.engine")
    assert "tensorrt" not in sys.modules
    assert not (tmp_path / "model.engine").exists()


def test_importing_the_module_leaves_tensorrt_unloaded():
    # The module is imported at the top of this file; nothing may have pulled tensorrt in since.
    assert HAVE_TRT or "tensorrt" not in sys.modules


# --- the TensorRT glue, against a stand-in `tensorrt` module ----------------------------------------
# The stand-in mirrors only the documented calls build_engine makes; it checks the flow (flags, FP32
# pinning, outputs, profile, timing cache, files), not TensorRT itself.

class _Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


class FakeLogger:
    WARNING = 2

    def __init__(self, severity):
        pass


class FakeTensor:
    def __init__(self, name, dtype="float32"):
        self.name, self.dtype = name, dtype


class FakeLayer:
    def __init__(self, name, inputs, outputs, metadata=""):
        self.name, self.metadata, self.inputs, self.outputs = name, metadata, inputs, outputs
        self.num_inputs, self.num_outputs = len(inputs), len(outputs)
        self.precision, self.output_types = None, {}

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


def fake_network(side=False, whitened=False):
    """frames -> cast -> [relu(., filters), pow: the inlined ai.edgehebb body] -> flatten -> shape (int64) / head
    (reading a weight constant) -> softmax, plus a constant nobody reads; ``side``: also a float layer
    beside the op (frames -> side -> aux), which neither feeds it nor follows it; ``whitened``: a whitened
    block, a standard convolution (reading its whitening constant) between the cast and the op."""
    t = {n: FakeTensor(n) for n in ("xf", "M", "r", "p", "f", "W", "logits", "probabilities", "unused", "aux",
                                    "Z", "z")}
    t["frames"], t["s"] = FakeTensor("frames", "uint8"), FakeTensor("s", "int64")
    whiten = [FakeLayer("block0.whitening", [], [t["Z"]]), FakeLayer("block0.whiten", [t["xf"], t["Z"]], [t["z"]])]
    op_input = t["z"] if whitened else t["xf"]
    layers = [FakeLayer("cast", [t["frames"]], [t["xf"]], "[ONNX Layer: cast]"),
              *(whiten if whitened else []),
              FakeLayer("block0.filters", [], [t["M"]]),
              FakeLayer("other_const", [], [t["unused"]]),
              FakeLayer("relu", [op_input, t["M"]], [t["r"]], "[ONNX Layer: relu | block0 (PatchNormPowReLU)]"),
              FakeLayer("pow", [t["r"], None], [t["p"]], "[ONNX Layer: pow | block0 (PatchNormPowReLU)]"),
              FakeLayer("flatten0", [t["p"]], [t["f"]]),
              FakeLayer("shape", [t["f"]], [t["s"]]),
              FakeLayer("head.weight", [], [t["W"]]),
              FakeLayer("head", [t["f"], t["W"]], [t["logits"]]),
              FakeLayer("softmax", [t["logits"]], [t["probabilities"]])]
    if side:
        layers.append(FakeLayer("side", [t["frames"]], [t["aux"]]))

    class Network:
        num_layers = len(layers)
        outputs = [t["logits"], t["probabilities"], t["f"]]

        def get_layer(self, i):
            return layers[i]

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, i):
            return self.outputs[i]

        def unmark_output(self, tensor):
            self.outputs.remove(tensor)

    return Network(), {layer.name: layer for layer in layers}


def fake_tensorrt(version, parse_ok=True, side=False, whitened=False):
    import types

    trt = types.SimpleNamespace(__version__=version, float32="float32", calls=[])
    trt.NetworkDefinitionCreationFlag = _Enum("STRONGLY_TYPED")
    trt.BuilderFlag = _Enum("FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32")
    trt.MemoryPoolType = _Enum("WORKSPACE")

    class Config:
        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("workspace", size))

        def set_flag(self, flag):
            trt.calls.append(("set", flag))

        def clear_flag(self, flag):
            trt.calls.append(("clear", flag))

        def add_optimization_profile(self, profile):
            trt.calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: data + b"+run")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.calls.append(("flags", flags))
            trt.network, trt.layers = fake_network(side, whitened)
            return trt.network

        create_builder_config = Config
        create_optimization_profile = Profile

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return "In node 3 (importPow): UNSUPPORTED_NODE"

    trt.Logger, trt.Builder, trt.OnnxParser = FakeLogger, Builder, OnnxParser
    return trt


def test_fp16_build_pins_the_op_what_feeds_it_and_what_follows(tmp_path, monkeypatch):
    trt = fake_tensorrt("10.8.0.43", side=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = tmp_path / "model.onnx"
    onnx.save(tiny_model("frames", ("batch", 32, 32, 3), TensorProto.UINT8, blocks=1), onnx_path)
    (tmp_path / "timing.cache").write_bytes(b"old")
    logs = []
    engine = build_engine(onnx_path, tmp_path / "m.engine", fp16=True, batch=(1, 4, 8), workspace_mib=64,
                          timing_cache=tmp_path / "timing.cache", outputs=["probabilities"], log=logs.append)

    pinned = {n for n, layer in trt.layers.items() if layer.precision == "float32"}
    # the cast before the op (FP16 there rounds the op's input), the op, its filters, what follows and the
    # head's weights; not the int64 shape, the unread constant or the layer beside the op
    assert pinned == {"cast", "block0.filters", "relu", "pow", "flatten0", "head.weight", "head", "softmax"}
    assert trt.layers["pow"].output_types == {0: "float32"}
    assert ("flags", 0) in trt.calls                                      # weakly typed for BuilderFlag.FP16
    assert {("set", trt.BuilderFlag.FP16), ("set", trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS),
            ("clear", trt.BuilderFlag.TF32), ("workspace", 64 << 20),
            ("profile", ("frames", (1, 32, 32, 3), (4, 32, 32, 3), (8, 32, 32, 3)))} <= set(trt.calls)
    assert [t.name for t in trt.network.outputs] == ["probabilities"]
    assert engine.read_bytes() == b"PLAN" and (tmp_path / "timing.cache").read_bytes() == b"old+run"
    meta = json.loads(sidecar_path(engine).read_text())
    assert meta["precision"] == "fp16" and meta["outputs"] == ["probabilities"] and meta["classes"] == CIFAR10
    assert meta["custom_op"] == {"domain": CUSTOM_DOMAIN, "nodes": ["block0"], "fp32_layers": 8}
    assert meta["input"] == {"name": "frames", "dtype": "uint8", "layout": "NHWC"}
    exported = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props if p.key.startswith("edgehebb.")}
    assert exported and meta["onnx"]["metadata"] == exported   # the runtime reads the baked fit from here
    assert any("8 layers pinned to FP32" in line and "1 may run in FP16" in line for line in logs)


def test_fp16_build_pins_a_whitened_blocks_whitening_too(tmp_path, monkeypatch):
    # a whitened block's standard Conv feeds the op two layers from the input: the walk back pins it and
    # its whitening matrix (FP16 there would round every whitened patch before the norm and the power)
    trt = fake_tensorrt("10.8.0.43", side=True, whitened=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = tmp_path / "model.onnx"
    onnx.save(tiny_model("frames", ("batch", 32, 32, 3), TensorProto.UINT8, blocks=1), onnx_path)
    build_engine(onnx_path, tmp_path / "m.engine", fp16=True, log=lambda m: None)
    pinned = {n for n, layer in trt.layers.items() if layer.precision == "float32"}
    assert {"cast", "block0.whitening", "block0.whiten", "block0.filters", "relu", "pow"} <= pinned
    assert "side" not in pinned and "other_const" not in pinned


def test_fp16_that_would_change_nothing_is_refused(tmp_path, monkeypatch):
    # edgehebb's own graphs: every float layer feeds the op or follows it, so FP16 would leave all FP32
    trt = fake_tensorrt("10.8.0.43")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = tmp_path / "model.onnx"
    onnx.save(tiny_model("frames", ("batch", 32, 32, 3), TensorProto.UINT8, blocks=1), onnx_path)
    with pytest.raises(EdgehebbError, match="--fp16 would change nothing for model.onnx") as e:
        build_engine(onnx_path, tmp_path / "m.engine", fp16=True, log=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "m.engine").exists()


def test_unreadable_timing_cache_is_one_line(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.8.0.43"))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")

    def unreadable(self):   # chmod does not stop root, who runs CI
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(cache), "read_bytes", unreadable)
    with pytest.raises(EdgehebbError, match="cannot read the timing cache .*Permission denied"):
        build_engine(tiny_onnx, tmp_path / "m.engine", timing_cache=cache, log=lambda m: None)
    assert not (tmp_path / "m.engine").exists()


def test_fp32_build_is_strongly_typed_and_parser_errors_are_reported(tiny_onnx, tmp_path, monkeypatch):
    trt = fake_tensorrt("10.15.1.29")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_engine(tiny_onnx, tmp_path / "m.engine", log=lambda m: None)
    assert ("flags", 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) in trt.calls
    assert all(layer.precision is None for layer in trt.layers.values())

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.15.1.29", parse_ok=False))
    with pytest.raises(EdgehebbError, match="could not parse .*UNSUPPORTED_NODE"):
        build_engine(tiny_onnx, tmp_path / "other.engine", log=lambda m: None)
    assert not (tmp_path / "other.engine").exists()


def test_fp16_with_tensorrt_11_fails_before_building(tiny_onnx, tmp_path, monkeypatch):
    trt = fake_tensorrt("11.5.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(EdgehebbError, match="strongly typed"):
        build_engine(tiny_onnx, tmp_path / "m.engine", fp16=True)
    assert trt.calls == []


def fake_runtime_tensorrt(version="10.8.0.43"):
    """Stand-in for the runtime calls TrtRunner makes. The engine takes images (N, 3, 4, 4), profile 1..4;
    `execute_async_v3` computes logits = the first two pixels, softmax and features = the flattened image
    with torch, on the stream TensorRT was handed, into the buffers bound by address."""
    import types

    import torch

    trt = types.SimpleNamespace(__version__=version, TensorIOMode=_Enum("INPUT", "OUTPUT"))
    names = ["images", "logits", "probabilities", "features"]
    width = {"logits": 2, "probabilities": 2, "features": 48}
    profile = [(1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)]

    class Context:
        def __init__(self):
            self.shape, self.address, self.streams = profile[2], {}, []

        def set_input_shape(self, name, shape):
            ok = name == "images" and profile[0] <= tuple(shape) <= profile[2]
            if ok:
                self.shape = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return (self.shape[0], width[name])

        def set_tensor_address(self, name, ptr):
            self.address[name] = ptr

        def execute_async_v3(self, handle):
            assert handle == torch.cuda.current_stream().cuda_stream   # work goes to the stream handed in
            self.streams.append(handle)
            t = {k: self.resolve(p) for k, p in self.address.items()}
            n = self.shape[0]
            x = t["images"][:n].flatten(1)
            t["logits"][:n] = x[:, :2]
            t["probabilities"][:n] = torch.softmax(x[:, :2], 1)
            t["features"][:n] = x
            return True

    class Engine:
        num_io_tensors = len(names)

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "images" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name="FLOAT")

        def get_tensor_profile_shape(self, name, index):
            return profile

        def create_execution_context(self):
            trt.context = Context()
            return trt.context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"PLAN" else None

    trt.Logger, trt.Runtime = FakeLogger, Runtime
    return trt


def test_runner_refuses_a_missing_engine_and_a_machine_without_a_gpu(tmp_path, monkeypatch):
    """TrtRunner over the stand-in, as on a CPU machine (CI): each refusal is one line. Running an engine
    needs CUDA buffers and streams, so the runner's run is the GPU test below."""
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as on a machine without a GPU, also on one
    with pytest.raises(EdgehebbError, match="missing.engine does not exist"):
        TrtRunner(tmp_path / "missing.engine")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    sidecar_path(engine).write_text(json.dumps({"tensorrt": "10.8.0.43", "classes": ["a", "b"]}))
    with pytest.raises(EdgehebbError) as e:
        TrtRunner(engine)
    assert "TrtRunner needs a CUDA GPU" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.gpu
def test_runner_binds_buffers_once_and_runs_on_its_stream(tmp_path, monkeypatch, cuda_gpu):
    import torch

    trt = fake_runtime_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    sidecar_path(engine).write_text(json.dumps({"tensorrt": "10.8.0.43", "classes": ["a", "b"]}))

    runner = TrtRunner(engine)
    trt.context.resolve = lambda ptr: next(b for b in runner._buffers.values() if b.data_ptr() == ptr)
    assert (runner.classes, runner.min_batch, runner.max_batch, runner.sample_shape) == (["a", "b"], 1, 4, (3, 4, 4))
    x = np.random.default_rng(0).random((3, 3, 4, 4))                 # float64 numpy: converted on the copy
    out = runner.infer(x)
    flat = torch.from_numpy(x).float().flatten(1)
    assert torch.equal(out["features"].cpu(), flat) and torch.equal(out["logits"].cpu(), flat[:, :2])
    assert trt.context.streams == [runner._stream.cuda_stream]

    ptrs = {k: v.data_ptr() for k, v in out.items()}
    y = torch.rand(1, 3, 4, 4, device="cuda")
    runner.infer(y)                                                     # warm: batch size changes once
    before = torch.cuda.memory_allocated()
    again = runner.infer(y)
    assert torch.cuda.memory_allocated() == before                      # steady state allocates nothing
    assert {k: v.data_ptr() for k, v in again.items()} == ptrs and again["probabilities"].shape == (1, 2)
    assert torch.equal(again["features"], y.flatten(1))

    with pytest.raises(EdgehebbError, match=r"outside the engine's profile \(1..4\)"):
        runner.infer(np.zeros((5, 3, 4, 4), np.float32))
    with pytest.raises(EdgehebbError, match="float images"):
        runner.infer(np.zeros((2, 3, 4, 4), np.uint8))
    engine.write_bytes(b"other")
    with pytest.raises(EdgehebbError, match="built with TensorRT 10.8.0.43"):
        TrtRunner(engine)


# --- DeepStream template --------------------------------------------------------------------------

def read_nvinfer_config(path: Path) -> dict[str, str]:
    """key=value pairs of the [property] group (GKeyFile syntax: '#' comments, no inline comments)."""
    props, group = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            group = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        assert group == "property", f"{key} outside [property]"
        assert key.strip() not in props, f"duplicate key {key}"
        props[key.strip()] = value.strip()
    return props


# Keys from DeepStream's gstnvinfer_property_parser.h that the template may use (a typo fails here).
NVINFER_KEYS = {"gpu-id", "onnx-file", "model-engine-file", "labelfile-path", "batch-size", "network-mode",
                "network-type", "classifier-type", "process-mode", "gie-unique-id", "infer-dims",
                "model-color-format", "net-scale-factor", "offsets", "maintain-aspect-ratio", "symmetric-padding",
                "scaling-filter", "scaling-compute-hw", "output-blob-names", "classifier-threshold", "interval",
                "operate-on-gie-id", "operate-on-class-ids", "network-input-order"}


def test_deepstream_template_matches_the_model_and_labels():
    from edgehebb.nnl import load_spec

    props = read_nvinfer_config(DEEPSTREAM / "config_infer_edgehebb.txt")
    assert set(props) <= NVINFER_KEYS, set(props) - NVINFER_KEYS
    assert props["network-mode"] == "0"                       # FP32
    assert props["network-type"] == "1"                       # classifier
    assert props["model-color-format"] == "0"                 # RGB
    assert props["output-blob-names"] == "probabilities"
    assert math.isclose(float(props["net-scale-factor"]), 1 / 255, rel_tol=1e-7)
    assert [float(v) for v in props["offsets"].split(";")] == [0.0, 0.0, 0.0]
    spec = load_spec("fig2_left")
    assert tuple(int(v) for v in props["infer-dims"].split(";")) == spec.input
    assert 0.0 < float(props["classifier-threshold"]) < 1.0
    assert int(props["scaling-filter"]) in range(7) and props["process-mode"] in ("1", "2")

    lines = [ln for ln in (DEEPSTREAM / props["labelfile-path"]).read_text().splitlines() if ln.strip()]
    # One line per output layer: a single softmax output, so a single line of ';'-separated labels.
    assert len(lines) == len(props["output-blob-names"].split(";")) == 1
    labels = lines[0].split(";")
    assert labels == CIFAR10 and len(labels) == spec.classes


# --- with TensorRT --------------------------------------------------------------------------------

def real_tensorrt(test):
    """A test that builds a real engine: marked `trt` and `gpu`, skipped without TensorRT (and, through the
    `cuda_gpu` fixture it takes, without a CUDA GPU)."""
    test = pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT (pip install 'edgehebb[gpu]')")(test)
    return pytest.mark.gpu(pytest.mark.trt(test))


@pytest.fixture
def cuda_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@real_tensorrt
def test_build_and_run_matches_onnxruntime(tiny_onnx, tmp_path, cuda_gpu):
    import onnxruntime as ort
    import torch

    engine = build_engine(tiny_onnx, tmp_path / "model.engine", batch=(1, 2, 4), workspace_mib=256,
                          timing_cache=tmp_path / "timing.cache", log=lambda m: None)
    meta = json.loads(sidecar_path(engine).read_text())
    assert meta["classes"] == CIFAR10 and meta["profile"]["max"] == [4, 3, 32, 32]
    assert (tmp_path / "timing.cache").stat().st_size > 0

    runner = TrtRunner(engine)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    out = runner.infer(x)
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    expected = dict(zip(["logits", "probabilities", "features"],
                        ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})))
    for name in expected:
        np.testing.assert_allclose(out[name].cpu().numpy(), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    again = runner.infer(torch.from_numpy(x[:1]).cuda())      # steady state: same buffers, no new ones
    assert {k: v.data_ptr() for k, v in again.items()} == ptrs and again["logits"].shape[0] == 1
    with pytest.raises(EdgehebbError, match="outside the engine's profile"):
        runner.infer(np.zeros((5, 3, 32, 32), np.float32))


@real_tensorrt
@pytest.mark.parametrize("preprocess", ["none", "uint8-nhwc"])
def test_exported_nnl_models_build_and_match_onnxruntime(tmp_path, preprocess, cuda_gpu):
    # the real op body, not the stand-in above: a centred block and an uncentred, padded, strided one
    import torch

    from edgehebb.nnl.model import save_model
    from edgehebb.nnl import NNLNet
    from edgehebb.deploy.onnx_export import export_onnx
    from tests.test_onnx_export import CLASSES, SPEC, patch_filters, ready

    x = torch.rand(8, *SPEC.input, generator=torch.Generator().manual_seed(0))
    save_model(tmp_path / "m", ready(NNLNet(SPEC, patch_filters(x, SPEC, seed=1)), x), CLASSES)
    frames = preprocess == "uint8-nhwc"
    path = export_onnx(tmp_path / "m", tmp_path / "m.onnx", preprocess=preprocess,
                       frame_size=(24, 32) if frames else None)
    feed = np.random.default_rng(1).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8) if frames else x[:5].numpy()
    assert_engine_matches_onnxruntime(path, feed, tmp_path / "m.engine")


def assert_engine_matches_onnxruntime(path, feed: np.ndarray, engine_path) -> None:
    """An engine built from the ONNX file at ``path``: its logits of ``feed`` within OP_SPEC's 1e-4 of each
    row's largest |logit| from ONNX Runtime on the CPU, and the same top-1."""
    import onnxruntime as ort

    engine = build_engine(path, engine_path, batch=(1, 4, 8), workspace_mib=256, log=lambda m: None)
    got = TrtRunner(engine).infer(feed)["logits"].cpu().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(["logits"], {sess.get_inputs()[0].name: feed})[0]
    assert (np.abs(got - want).max(1) <= 1e-4 * np.abs(want).max(1)).all()
    assert (got.argmax(1) == want.argmax(1)).all()


@real_tensorrt
def test_a_whitened_model_builds_and_matches_onnxruntime(whitened_model, tmp_path, cuda_gpu):
    # a whitened block: a standard Conv before the op (never run through TensorRT on this project's machines)
    from edgehebb.deploy.onnx_export import export_onnx

    path = export_onnx(whitened_model[0], tmp_path / "w.onnx")
    feed = np.random.default_rng(2).random((5, 3, 16, 16), dtype=np.float32)
    assert_engine_matches_onnxruntime(path, feed, tmp_path / "w.engine")


def test_fp16_of_a_standard_ops_file_is_refused_before_building(tmp_path, monkeypatch):
    # a --standard-ops file has no ai.edgehebb node left to pin FP32 from, whoever calls build_engine
    trt = fake_tensorrt("10.8.0.43")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 48])
    graph = helper.make_graph([helper.make_node("Flatten", ["images"], ["logits"])], "standard", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {CLASSES_KEY: json.dumps(CIFAR10)})
    path = tmp_path / "standard.onnx"
    onnx.save(model, path)
    with pytest.raises(EdgehebbError, match="no ai.edgehebb nodes .*default export") as e:
        build_engine(path, tmp_path / "m.engine", fp16=True, log=lambda m: None)
    assert "\n" not in str(e.value) and trt.calls == [] and not (tmp_path / "m.engine").exists()
