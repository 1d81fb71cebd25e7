"""ONNX export: one custom-domain node per NNL-CONV block, its definition shipped inside the file.

Every patch-normalised block becomes one node ``ai.edgehebb::PatchNormPowReLU`` (``export/OP_SPEC.md``)
and the model carries a model-local ``FunctionProto`` of that name whose body uses only standard ONNX
ops. ONNX Runtime inlines the body; TensorRT imports it as a local function or, from 10.7, runs a
plugin registered under the same name and namespace instead. With ``standard_ops=True`` the file
is instead the same graph with the functions inlined and constants folded
(:mod:`edgehebb.deploy.onnx_standard`): standard ops only, for OpenCV DNN and other clients that ignore
local functions. Both forms carry every activation's shape (static but for the batch when the
input size is fixed). The graph is built by hand with
``onnx.helper`` rather than traced from torch: node boundaries, names and attributes are the
contract with the plugin and the runtime, and building them directly keeps them exactly so.

Graph: [frames uint8 NHWC -> preprocessing, as :mod:`edgehebb.deploy.frames`] -> images float32 NCHW
-> [colour normalisation, standard ops, when the spec has one] -> blocks side by side -> Flatten, Concat = ``features`` -> (f - mean) * scale -> Gemm = ``logits``
-> Softmax = ``probabilities``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgehebb import __version__
from edgehebb.deploy import op
from edgehebb.deploy.onnx_op import FLOAT, MIN_OPSET, op_function
from edgehebb.errors import EdgehebbError
from edgehebb.deploy.frames import CHANNEL_ORDERS, FITS, check_choice, crop_box
from edgehebb.io import atomic_write
from edgehebb.nnl.model import load_model, model_kind
from edgehebb.nnl.layers import COLOUR_EPS, ConvBlock, HiddenHead, NNLConv, Net
from edgehebb.nnl.spec import feature_dim
from edgehebb.deploy.onnx_standard import activation_shapes, standard_ops as to_standard_ops

PREPROCESS = ("none", "uint8-nhwc")


# ----------------------------------------------------------------------------- graph building

class _Graph:
    """Nodes and initializers of the main graph, with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: list[onnx.ValueInfoProto] = []   # declared where shape inference cannot tell
        self._count = 0

    def init(self, name: str, value) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def add(self, op: str, inputs: list[str], name: str | None = None, domain: str = "", **attrs) -> str:
        self._count += 1
        out = name or f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain or None, **attrs))
        return out


def op_version(net: Net) -> int:
    """The ``ai.edgehebb`` version ``net`` exports with: 2 if a block has sigma > 0, else 1."""
    return op.SIGMA_VERSION if any(getattr(b, "sigma", 0.0) for b in net.blocks) else op.VERSION


def _colour_norm(g: _Graph, x: str, mode: str, size: tuple[int, int, int]) -> str:
    """``nnl.colour_normalise`` in standard ops: x * mean_c(mu_c) / max(mu_c, COLOUR_EPS), mu_c a channel's
    image mean (ReduceSum over H, W divided by H * W: ReduceSum takes its axes as an input at every opset
    from 13, ReduceMean only from 18)."""
    if mode == "none":
        return x
    c, h, w = size
    s = g.add("ReduceSum", [x, g.init("colour_norm.hw_axes", np.array([2, 3], np.int64))], "colour_norm.sum",
              keepdims=1)
    mu = g.add("Div", [s, g.init("colour_norm.pixels", np.float32(h * w))], "colour_norm.mean")
    grey = g.add("ReduceSum", [mu, g.init("colour_norm.c_axis", np.array([1], np.int64))], "colour_norm.grey_sum",
                 keepdims=1)
    grey = g.add("Div", [grey, g.init("colour_norm.channels", np.float32(c))], "colour_norm.grey")
    den = g.add("Max", [mu, g.init("colour_norm.eps", np.float32(COLOUR_EPS))], "colour_norm.den")
    gain = g.add("Div", [grey, den], "colour_norm.gain")
    return g.add("Mul", [x, gain], "colour_norm")


def _nnl_block(g: _Graph, x: str, block: NNLConv, i: int, version: int = op.VERSION) -> str:
    """One NNLConv block: the custom node (norm=True) or, for the norm=False ablation, standard ops."""
    if block.norm:
        stride, padding = block.stride, block.padding
        if block.whitening is not None:
            # a whitened block: a standard Conv whitens every patch into N channels, and the op runs on those
            # as 1 x 1 patches (models/MODEL_FORMAT.md); its stride and padding belong to the Conv
            x = g.add("Conv", [x, g.init(f"block{i}.whitening", block.whitening)], f"block{i}.whiten",
                      strides=[stride] * 2, pads=[padding] * 4, kernel_shape=list(block.whitening.shape[2:]))
            stride, padding = 1, 0
        m = g.init(f"block{i}.filters", block.weight)  # raw: the op normalises and centres them itself
        extra = {"sigma": float(block.sigma)} if version == op.SIGMA_VERSION else {}
        return g.add(op.NAME, [x, m], f"block{i}", domain=op.DOMAIN,
                     strides=[stride] * 2, padding=padding, pool_shape=[block.pool] * 2,
                     pool_strides=[block.pool_stride] * 2, power=block.power, eps=block.eps,
                     center=int(block.center), **extra)
    # Without the patch norm the block is a plain convolution of the (shifted) image with fixed
    # filters: no custom op needed, the filter preprocessing is done here once.
    m = block.unit_weight().detach()
    if block.center:
        m = m - m.mean(dim=(1, 2, 3), keepdim=True)
    if block.padding:
        pads = g.init(f"block{i}.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64) * block.padding)
        x = g.add("Pad", [x, pads], f"block{i}.pad")
    if block.center:
        x = g.add("Sub", [x, g.init(f"block{i}.half", np.float32(0.5))], f"block{i}.shift")
    y = g.add("Conv", [x, g.init(f"block{i}.filters", m)], f"block{i}.conv", strides=[block.stride] * 2)
    return _pool_relu_pow(g, y, block.pool, block.pool_stride, block.power, i)


def _pool_relu_pow(g: _Graph, y: str, pool: int, pool_stride: int, power: float, i: int) -> str:
    y = g.add("MaxPool", [y], f"block{i}.pool", kernel_shape=[pool] * 2, strides=[pool_stride] * 2)
    y = g.add("Relu", [y], f"block{i}.relu" if power != 1 else f"block{i}")
    if power == 1:  # as nnl._relu_pow: no Pow for n = 1
        return y
    return g.add("Pow", [y, g.init(f"block{i}.power", np.float32(power))], f"block{i}")


def _conv_block(g: _Graph, x: str, block: ConvBlock, i: int) -> str:
    """A CONV-twin block: Conv(+bias) -> MaxPool -> Relu -> Pow, standard ops only."""
    conv = block.conv
    w, b = g.init(f"block{i}.weight", conv.weight), g.init(f"block{i}.bias", conv.bias)
    y = g.add("Conv", [x, w, b], f"block{i}.conv", strides=list(conv.stride),
              pads=[*conv.padding, *conv.padding], kernel_shape=list(conv.kernel_size))  # [h0, w0, h1, w1]
    return _pool_relu_pow(g, y, block.pool, block.pool_stride, block.power, i)


def _preprocess_frames(g: _Graph, frames: str, size: tuple[int, int], channel_order: str, fit: str,
                       frame_size: tuple[int, int] | None) -> str:
    """uint8 NHWC frames -> float32 NCHW RGB in [0, 1] of the model's (H, W): edgehebb.deploy.frames' steps."""
    th, tw = size
    # Cast first: TensorRT takes uint8 only at the network boundary and in Cast.
    x = g.add("Cast", [frames], "frames.float", to=FLOAT)
    x = g.add("Div", [x, g.init("frames.255", np.float32(255.0))], "frames.unit")  # a true division, as torch
    x = g.add("Transpose", [x], "frames.nchw", perm=[0, 3, 1, 2])
    if channel_order == "bgr":
        x = g.add("Gather", [x, g.init("frames.bgr2rgb", np.array([2, 1, 0], np.int64))], "frames.rgb", axis=1)
    if frame_size is not None:  # sizes known now: the crop and whether to resize are decided here
        h, w = frame_size
        if fit == "center-crop":
            top, left, rows, cols = crop_box(h, w, size)
            if (rows, cols) != (h, w):
                x = g.add("Slice", [x, g.init("crop.starts", np.array([top, left], np.int64)),
                                    g.init("crop.ends", np.array([top + rows, left + cols], np.int64)),
                                    g.init("crop.axes", np.array([2, 3], np.int64))], "frames.crop")
            h, w = rows, cols
        if (h, w) == (th, tw):
            return x
    elif fit == "center-crop":  # dynamic frame size: edgehebb.deploy.frames.crop_box in int64 graph arithmetic
        hw = g.add("Shape", [frames], "crop.hw", start=1, end=3)
        h = g.add("Slice", [hw, g.init("crop.i0", np.array([0], np.int64)),
                            g.init("crop.i1", np.array([1], np.int64))], "crop.h")
        w = g.add("Slice", [hw, "crop.i1", g.init("crop.i2", np.array([2], np.int64))], "crop.w")
        th_, tw_ = g.init("crop.th", np.array([th], np.int64)), g.init("crop.tw", np.array([tw], np.int64))
        rows = g.add("Min", [h, g.add("Div", [g.add("Mul", [w, th_], "crop.w_th"), tw_], "crop.w_th_tw")],
                     "crop.rows")
        cols = g.add("Min", [w, g.add("Div", [g.add("Mul", [h, tw_], "crop.h_tw"), th_], "crop.h_tw_th")],
                     "crop.cols")
        two = g.init("crop.two", np.array([2], np.int64))
        top = g.add("Div", [g.add("Sub", [h, rows], "crop.dh"), two], "crop.top")
        left = g.add("Div", [g.add("Sub", [w, cols], "crop.dw"), two], "crop.left")
        starts = g.add("Concat", [top, left], "crop.starts", axis=0)
        ends = g.add("Concat", [g.add("Add", [top, rows], "crop.bottom"),
                                g.add("Add", [left, cols], "crop.right")], "crop.ends", axis=0)
        x = g.add("Slice", [x, starts, ends, g.init("crop.axes", np.array([2, 3], np.int64))], "frames.crop")
    # Resize to (H, W); with dynamic frames it always runs (an exact copy when the size already fits).
    nc = g.add("Shape", [x], "resize.nc", start=0, end=2)
    sizes = g.add("Concat", [nc, g.init("resize.hw", np.array([th, tw], np.int64))], "resize.sizes", axis=0)
    # ONNX shape inference cannot follow the batch through Shape -> Concat -> Resize (it names it
    # anew, unk__0), so the output's shape is declared; everything after it is then inferred
    g.shapes.append(helper.make_tensor_value_info("frames.resized", FLOAT, ["batch", 3, th, tw]))
    return g.add("Resize", [x, "", "", sizes], "frames.resized", mode="linear",
                 coordinate_transformation_mode="half_pixel")


def _check_opset(opset: int) -> int:
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise EdgehebbError(f"opset {opset!r} is not supported: use {MIN_OPSET} to {latest} "
                            f"(the installed onnx's newest)")
    return opset


def _check_frame_size(frame_size) -> tuple[int, int] | None:
    if frame_size is None:
        return None
    try:
        h, w = (int(v) for v in frame_size)
    except (TypeError, ValueError):
        raise EdgehebbError(f"frame size must be (height, width), got {frame_size!r}") from None
    if h < 1 or w < 1:
        raise EdgehebbError(f"frame size must be positive, got {h}x{w}")
    return h, w


def build_model_proto(net: Net, classes: list[str], *, preprocess: str | None = None,
                      channel_order: str = "rgb", frame_size: tuple[int, int] | None = None,
                      fit: str = "resize", opset: int = MIN_OPSET, standard_ops: bool = False) -> onnx.ModelProto:
    """The ONNX model of ``net`` (an NNLNet or ConvNet) with the input/output contract of export_onnx."""
    preprocess = check_choice("none" if preprocess is None else preprocess, PREPROCESS, "preprocess")
    check_choice(channel_order, CHANNEL_ORDERS, "channel order")
    check_choice(fit, FITS, "fit")
    opset, frame_size = _check_opset(opset), _check_frame_size(frame_size)
    kind, _ = model_kind(net)
    spec = net.spec
    c, h, w = spec.input
    if len(classes) != spec.classes:
        raise EdgehebbError(f"{len(classes)} class names for a {spec.classes}-class network")
    if preprocess == "none" and (channel_order != "rgb" or fit != "resize" or frame_size is not None):
        raise EdgehebbError("channel order, fit and frame size apply to preprocess 'uint8-nhwc' only "
                            "(float images enter as RGB NCHW at the model's size)")
    if preprocess == "uint8-nhwc" and c != 3:
        raise EdgehebbError(f"preprocess 'uint8-nhwc' needs a 3-channel model, {spec.name} takes {c} channels")
    if standard_ops and preprocess == "uint8-nhwc" and frame_size is None:
        raise EdgehebbError("standard ops with preprocess 'uint8-nhwc' need a frame size (--frame-size HxW): "
                            "that file promises a static shape for every activation but the batch")

    g = _Graph()
    if preprocess == "none":
        name, layout, dtype, value_range, dims = "images", "NCHW", "float32", [0.0, 1.0], ["batch", c, h, w]
        graph_input = helper.make_tensor_value_info(name, FLOAT, dims)
        x = name
    else:
        fh, fw = frame_size or ("height", "width")
        name, layout, dtype, value_range, dims = "frames", "NHWC", "uint8", [0, 255], ["batch", fh, fw, 3]
        graph_input = helper.make_tensor_value_info(name, TensorProto.UINT8, dims)
        x = _preprocess_frames(g, name, (h, w), channel_order, fit, frame_size)

    x = _colour_norm(g, x, spec.colour_norm, spec.input)
    version = op_version(net)
    outs = []
    for i, block in enumerate(net.blocks):
        if isinstance(block, NNLConv):
            y = _nnl_block(g, x, block, i, version)
        elif isinstance(block, ConvBlock):
            y = _conv_block(g, x, block, i)
        else:
            raise EdgehebbError(f"cannot export block {i} of type {type(block).__name__}")
        outs.append(g.add("Flatten", [y], f"block{i}.flat", axis=1))
    feats = outs[0] if len(outs) == 1 else g.add("Concat", outs, "features.concat", axis=1)
    g.add("Identity", [feats], "features")
    z = g.add("Sub", ["features", g.init("feature_mean", net.feature_mean)], "features.centred")
    z = g.add("Mul", [z, g.init("feature_scale", net.feature_scale)], "features.standardised")
    if isinstance(net.head, HiddenHead):
        hidden = net.head.hidden
        z = g.add("Gemm", [z, g.init("head.hidden.weight", hidden.weight), g.init("head.hidden.bias", hidden.bias)],
                  "head.hidden", transB=1)
        z = g.add("Relu", [z], "head.hidden.relu")
        out, prefix = net.head.out, "head.out"   # initializers named as the model file's tensors
    else:
        out, prefix = net.head, "head"
    g.add("Gemm", [z, g.init(f"{prefix}.weight", out.weight), g.init(f"{prefix}.bias", out.bias)], "logits",
          transB=1)
    g.add("Softmax", ["logits"], "probabilities", axis=1)

    d, k = feature_dim(spec), spec.classes
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", k]),
               helper.make_tensor_value_info("probabilities", FLOAT, ["batch", k]),
               helper.make_tensor_value_info("features", FLOAT, ["batch", d])]
    graph = helper.make_graph(g.nodes, spec.name, [graph_input], outputs, initializer=g.initializers,
                              value_info=g.shapes)
    uses_op = any(n.domain == op.DOMAIN for n in g.nodes)
    model = helper.make_model(
        graph, producer_name="edgehebb", producer_version=__version__,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, version)],
        functions=[op_function(opset, version)] if uses_op else [],
        # the lowest IR that holds this opset (8 for 17): older runtimes and TensorRT parsers read it
        ir_version=max(8, helper.find_min_ir_version_for([helper.make_opsetid("", opset)])))
    model.doc_string = f"edgehebb {kind} network {spec.name}: {spec.description}".strip()
    input_meta = {"name": name, "layout": layout, "dtype": dtype, "range": value_range,
                  "channels": "BGR" if channel_order == "bgr" else "RGB", "shape": dims,
                  "model_input": [c, h, w]}
    if preprocess == "uint8-nhwc":
        input_meta["fit"] = fit
    helper.set_model_props(model, {
        op.META_CLASSES: json.dumps(list(classes)),
        op.META_OP_DOMAIN: op.DOMAIN,
        op.META_OP_VERSION: str(version),
        op.META_OP_NAME: op.NAME,
        # custom: PatchNormPowReLU nodes with their function; standard: inlined and folded (onnx_standard)
        op.META_OPS: "standard" if standard_ops else "custom",
        op.META_SPEC: json.dumps(spec.to_dict()),
        op.META_KIND: kind,
        op.META_INPUT: json.dumps(input_meta),
        # JSON object, so a runtime can tell which channel order / fit is baked in
        op.META_PREPROCESS: json.dumps({"mode": preprocess} if preprocess == "none" else
                                          {"mode": preprocess, "channel_order": channel_order, "fit": fit,
                                           "frame_size": list(frame_size) if frame_size else None}),
        op.META_VERSION: __version__,
    })
    if standard_ops:
        model = to_standard_ops(model)   # keeps the metadata, doc string and producer
        model.doc_string += " Standard ONNX ops only (the custom op inlined and constants folded)."
        return model
    # shape inference cannot see through the custom node (its pads come from an attribute): the
    # shapes come from the standard-ops form of this same graph, whose activations keep their names
    model.graph.value_info.extend(activation_shapes(model))
    return model


def export_onnx(model, out: str | os.PathLike, *, preprocess: str | None = None, channel_order: str = "rgb",
                frame_size: tuple[int, int] | None = None, fit: str = "resize", opset: int = MIN_OPSET,
                standard_ops: bool = False) -> Path:
    """Write ``model`` (model directory, shipped name, or a loaded ``(net, config)`` pair) as ONNX to ``out``.

    ``standard_ops``: no custom node and no function (for OpenCV DNN and other clients; see
    :mod:`edgehebb.deploy.onnx_standard`) instead of the default custom-op file.

    The file is checked with ``onnx.checker.check_model(full_check=True)`` before it is written,
    atomically. Returns ``out`` as a Path.
    """
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], Net) or not isinstance(model[1], dict):
            raise EdgehebbError("model must be a model directory, a shipped model name or a (net, config) pair")
        net, config = model
    elif isinstance(model, (str, os.PathLike)):
        net, config = load_model(model)
    else:
        raise EdgehebbError(f"model must be a model directory, a shipped model name or a (net, config) pair, "
                            f"got {type(model).__name__}")
    proto = build_model_proto(net, config["classes"], preprocess=preprocess, channel_order=channel_order,
                              frame_size=frame_size, fit=fit, opset=opset, standard_ops=standard_ops)
    onnx.checker.check_model(proto, full_check=True)  # a failure here is an exporter bug: keep the traceback
    out = Path(out)
    atomic_write(out, proto.SerializeToString())
    return out
