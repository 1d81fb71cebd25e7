"""The custom op's definition as an ONNX model-local function: ``ai.edgehebb::PatchNormPowReLU`` in standard ops.

Every export that uses the op carries this function, so stock ONNX Runtime (and TensorRT's parser)
inline it, while a plugin or a custom op registered under :data:`edgehebb.deploy.op.DOMAIN` and
:data:`~edgehebb.deploy.op.NAME` can claim the node instead. ``export/OP_SPEC.md`` specifies what it
computes; :mod:`edgehebb.nnl.layers` is the reference it is tested against.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from edgehebb.deploy import op
from edgehebb.errors import EdgehebbError

# 17: Shape(start=), ReduceSum/Pad/Clip/Resize with tensor inputs in the forms used here; TensorRT 8.6+ reads it.
MIN_OPSET = 17
FLOAT = TensorProto.FLOAT


def _ref(name: str, parent: str, attr_type: int) -> AttributeProto:
    """Body-node attribute ``name`` taking its value from the calling node's attribute ``parent``."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, parent, attr_type
    return a


def _const(name: str, value) -> onnx.NodeProto:
    """A Constant node: a float scalar, or a numpy array."""
    if isinstance(value, float):
        return helper.make_node("Constant", [], [name], value_float=value)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def _n(op: str, inputs: list[str], output: str, refs: tuple = (), **attrs) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, [output], **attrs)
    node.attribute.extend(refs)
    return node


def op_function(opset: int = MIN_OPSET, version: int = op.VERSION) -> onnx.FunctionProto:
    """The definition of ``PatchNormPowReLU``: Y = clip(maxpool(cos(X, M)), 0, 1) ^ power (OP_SPEC.md).

    ``version`` 2 adds the attribute ``sigma``: the patch norm becomes sqrt(|d|^2 + sigma^2) (+ eps, as in
    version 1); version 1's nodes are unchanged, so its files are exactly what they were.

    Numerics. The patch variance is computed in two passes on the patches themselves, not as
    s2 - s1^2 / N from two ones-convolutions: on a low-contrast patch (variance ~1e-4 beside
    s2 ~ 12) that difference cancels to a few percent error in the cosine, which ^40 turns into a
    factor ~2 (measured on CIFAR-10). So a convolution with one-hot kernels (the N x N identity,
    N = C*W*W) lays each patch out along the channel axis (an exact copy: every output is one pixel
    times 1 plus zeros), the mean is subtracted there, and both the variance and the dot product
    with the filters are taken on the centred patches (a 1 x 1 convolution: the same multiply-adds
    as the direct one). Float32 then stays within ~1e-5 of a float64 evaluation.

    ``center`` (0 or 1) enters arithmetically (shift = 0.5 * center, D = P - center * mean, ...), so
    one body serves both settings; center=0 pays only for a few unused elementwise ops. The filter
    preprocessing depends on the initializer M alone: ONNX Runtime folds it into constants at load.
    """
    I, F, INTS = AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS
    strides = (_ref("strides", "strides", INTS),)
    nodes = [
        # attributes that feed op inputs: Constant(value_* referring to the op's attribute)
        _n("Constant", [], "p", (_ref("value_int", "padding", I),)),
        _n("Constant", [], "center_i", (_ref("value_int", "center", I),)),
        _n("Constant", [], "eps", (_ref("value_float", "eps", F),)),
        _n("Constant", [], "n", (_ref("value_float", "power", F),)),
        _const("pad_unit", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        _const("axes", np.array([1, 2, 3], np.int64)),
        _const("channel", np.array([1], np.int64)),
        _const("one_one", np.array([1, 1], np.int64)),
        _const("half", 0.5), _const("zero", 0.0), _const("one", 1.0), _const("tiny", 1e-12),
        _n("Cast", ["center_i"], "cf", to=FLOAT),
        # zero padding in [0, 1] (black pixels), *then* the -0.5 shift: the order of nnl.NNLConv
        _n("Mul", ["pad_unit", "p"], "pads"),
        _n("Pad", ["X", "pads"], "Xp"),
        _n("Mul", ["half", "cf"], "shift"),
        _n("Sub", ["Xp", "shift"], "Xs"),
        # filters to unit length, then (center) minus their mean
        _n("Mul", ["M", "M"], "M2"),
        _n("ReduceSum", ["M2", "axes"], "M2s", keepdims=1),
        _n("Sqrt", ["M2s"], "Mnorm"),
        _n("Max", ["Mnorm", "tiny"], "Mnorm_c"),
        _n("Div", ["M", "Mnorm_c"], "U"),
        _n("Shape", ["M"], "k", end=1),
        _n("Shape", ["M"], "cww", start=1),
        # N = C * W * W as int64 [1], by Gather and Mul: shape arithmetic that shape inference (and
        # TensorRT's parser, whose EyeLike and computed-weight Conv need N at parse time) folds to a
        # constant, which it does not for ReduceProd
        _const("i0", np.array([0], np.int64)), _const("i1", np.array([1], np.int64)),
        _const("i2", np.array([2], np.int64)),
        _n("Gather", ["cww", "i0"], "c_i", axis=0),
        _n("Gather", ["cww", "i1"], "h_i", axis=0),
        _n("Gather", ["cww", "i2"], "w_i", axis=0),
        _n("Mul", ["c_i", "h_i"], "ch_i"),
        _n("Mul", ["ch_i", "w_i"], "N_i"),
        _n("Cast", ["N_i"], "N", to=FLOAT),
        _n("ReduceSum", ["U", "axes"], "Us", keepdims=1),
        _n("Div", ["Us", "N"], "Umean"),
        _n("Mul", ["Umean", "cf"], "Ushift"),
        _n("Sub", ["U", "Ushift"], "Mc"),
        _n("Concat", ["k", "N_i", "one_one"], "k_n_1_1", axis=0),
        _n("Reshape", ["Mc", "k_n_1_1"], "Mflat"),                        # (K, N, 1, 1), N in M's (C, W, W) order
        # one-hot kernels (N, C, W, W): P[:, j] = pixel j of each patch
        _n("Concat", ["N_i", "N_i"], "n_n", axis=0),
        _n("ConstantOfShape", ["n_n"], "zeros_nn", value=numpy_helper.from_array(np.zeros(1, np.float32))),
        _n("EyeLike", ["zeros_nn"], "eye"),
        _n("Concat", ["N_i", "cww"], "n_c_w_w", axis=0),
        _n("Reshape", ["eye", "n_c_w_w"], "E"),
        _n("Conv", ["Xs", "E"], "P", strides),
        # centred patches D (center=1) or raw ones (center=0); variance and dot product on them
        _n("ReduceSum", ["P", "channel"], "Psum", keepdims=1),
        _n("Div", ["Psum", "N"], "Pmean"),
        _n("Mul", ["Pmean", "cf"], "Pshift"),
        _n("Sub", ["P", "Pshift"], "D"),
        _n("Mul", ["D", "D"], "D2"),
        _n("ReduceSum", ["D2", "channel"], "var", keepdims=1),            # |v - mean(v)|^2, never < 0
        _n("Conv", ["D", "Mflat"], "dot"),                                 # <m - mean(m), v - mean(v)>
        *([_n("Constant", [], "sigma", (_ref("value_float", "sigma", F),)),
           _n("Mul", ["sigma", "sigma"], "sigma2"),
           _n("Add", ["var", "sigma2"], "var_s")] if version == op.SIGMA_VERSION else []),
        _n("Sqrt", ["var_s" if version == op.SIGMA_VERSION else "var"], "vnorm"),
        _n("Add", ["vnorm", "eps"], "den"),
        _n("Div", ["dot", "den"], "cos"),
        # pool first, then the power: ReLU(x)^n is monotonic, so this is exact and far cheaper
        _n("MaxPool", ["cos"], "pooled", (_ref("kernel_shape", "pool_shape", INTS),
                                          _ref("strides", "pool_strides", INTS))),
        # clip at 1: a cosine can round a hair above 1, and x^40 magnifies whatever is left there
        _n("Clip", ["pooled", "zero", "one"], "clipped"),
        _n("Pow", ["clipped", "n"], "Y"),
    ]
    if version not in op.VERSIONS:
        raise EdgehebbError(f"{op.NAME} has versions {op.VERSIONS}, not {version!r}")
    return helper.make_function(
        op.DOMAIN, op.NAME, inputs=["X", "M"], outputs=["Y"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(op.ATTRIBUTES[version]),
        doc_string="edgehebb NNL-CONV block: patch-normalised cosine with unit filters, max-pool, "
                   "clip to [0, 1], power. Specification: export/OP_SPEC.md.")
