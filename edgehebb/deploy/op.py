"""The custom op's contract, in one place: what an ONNX file says about itself and what a client may rely on.

Everything a plugin, a runtime or a test needs to recognise an edgehebb export: the op's domain, name,
versions and attributes (``export/OP_SPEC.md`` specifies what it computes), the keys of the metadata
every export carries, and OP_SPEC's parity metric with its tolerance. The ONNX function that defines
the op is built in :mod:`edgehebb.deploy.onnx_op`; TensorRT finds the op's layers by :data:`DOMAIN`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgehebb.errors import EdgehebbError

DOMAIN = "ai.edgehebb"
NAME = "PatchNormPowReLU"
VERSION = 1            # a model whose blocks all have sigma = 0 is written with this: files exactly as before
SIGMA_VERSION = 2      # version 1 plus the attribute ``sigma`` (semi-saturation), written when a block uses it
VERSIONS = (VERSION, SIGMA_VERSION)
ATTRIBUTES = {VERSION: ("strides", "padding", "pool_shape", "pool_strides", "power", "eps", "center")}
ATTRIBUTES[SIGMA_VERSION] = ATTRIBUTES[VERSION] + ("sigma",)

# ONNX metadata_props keys. Each value is a string; the JSON ones say so.
META_PREFIX = "edgehebb."
META_CLASSES = "edgehebb.classes"          # JSON list: class names, index = class id
META_OP_DOMAIN = "edgehebb.op_domain"      # DOMAIN
META_OP_NAME = "edgehebb.op_name"          # NAME
META_OP_VERSION = "edgehebb.op_version"    # "1" or "2": the version the file's nodes use
META_OPS = "edgehebb.ops"                  # "custom": the op's nodes and function; "standard": inlined and folded
META_SPEC = "edgehebb.spec"                # JSON: the network spec (models/MODEL_FORMAT.md)
META_KIND = "edgehebb.kind"                # "nnl" or "conv"
META_INPUT = "edgehebb.input"              # JSON: the graph input's name, layout, dtype, range, channels, shape
META_PREPROCESS = "edgehebb.preprocess"    # JSON: {"mode"} or {"mode", "channel_order", "fit", "frame_size"}
META_VERSION = "edgehebb.version"          # the edgehebb version that wrote the file

# OP_SPEC.md's acceptance: logits within this fraction of each row's largest |logit| of a float64 evaluation.
PARITY_TOLERANCE = 1e-4


def parse_version(text: str | None, where: str) -> int:
    """The op version of metadata ``text``; one that this edgehebb does not run is refused, naming ``where``."""
    if text not in {str(v) for v in VERSIONS}:
        raise EdgehebbError(f"{where} uses edgehebb op version {text!r}, but this edgehebb runs versions "
                            f"{', '.join(map(str, VERSIONS))}: re-export the model with this edgehebb")
    return int(text)


def parity_error(got, want) -> np.ndarray:
    """OP_SPEC's metric, per row: max_j |got_ij - want_ij| / max_j |want_ij| (``want``: the float64 reference).

    Accepts numpy arrays or torch tensors of shape (N, classes); returns (N,) float64.
    """
    got, want = (np.asarray(a.detach().cpu().double() if hasattr(a, "detach") else a, np.float64) for a in (got, want))
    if got.shape != want.shape or got.ndim != 2:
        raise EdgehebbError(f"parity needs two (N, classes) arrays of one shape, got {got.shape} and {want.shape}")
    return np.abs(got - want).max(1) / np.abs(want).max(1)


def parity(got, want) -> dict:
    """{"max_rel_of_row_max", "top1_agreement", "within_tolerance"} of ``got`` against the reference ``want``."""
    err = parity_error(got, want)
    got, want = (np.asarray(a.detach().cpu() if hasattr(a, "detach") else a) for a in (got, want))
    worst = float(err.max())
    return {"max_rel_of_row_max": worst, "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
            "within_tolerance": worst <= PARITY_TOLERANCE}


def load_onnx(path: str | Path):
    """An ONNX file's ModelProto (weights left external if they are), or one line saying why it is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise EdgehebbError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise EdgehebbError(f"{path} is not an ONNX model: {e}") from None


def read_metadata(path: str | Path, model=None) -> dict[str, str]:
    """The edgehebb metadata of an ONNX file (``model``: the file already loaded); a file that is not an
    edgehebb export, or whose op version this edgehebb does not run, is refused in one line."""
    model = load_onnx(path) if model is None else model
    meta = {p.key: p.value for p in model.metadata_props}
    if not model.graph.node or META_CLASSES not in meta:
        raise EdgehebbError(f"{path} is not an edgehebb ONNX export (no graph or no {META_CLASSES} metadata); "
                            f"export one with `edgehebb export`")
    parse_version(meta.get(META_OP_VERSION), str(path))
    return meta


def json_metadata(meta: dict, key: str, where: str | Path):
    """A JSON-valued metadata entry, decoded; a missing or broken one names the file and the key."""
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise EdgehebbError(f"{where}: metadata {key!r} is missing or not JSON ({e})") from None
