"""``edgehebb export``: a trained model to ONNX (and, with ``--trt``, a TensorRT engine).

Registered in ``cli.py`` with ``cli.add_command(export)``. Only click and the standard library at
module level, so ``edgehebb --help`` loads neither onnx nor TensorRT.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from edgehebb.cli.options import given
from edgehebb.errors import EdgehebbError

# edgehebb.deploy.tensorrt_engine.build_engine's default profile, repeated here so that --help shows it
# without importing that module (a test keeps the two equal)
TRT_BATCH = (1, 32, 256)


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"MIN,OPT,MAX"`` -> (min, opt, max) with 1 <= min <= opt <= max."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise EdgehebbError(f"--batch must be three integers MIN,OPT,MAX (e.g. 1,1,8), got {text!r}")
    lo, opt, hi = (int(p) for p in parts)
    if not 1 <= lo <= opt <= hi:
        raise EdgehebbError(f"--batch {text!r} must satisfy 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parse_frame_size(text: str | None) -> tuple[int, int] | None:
    """``"HxW"`` (e.g. ``480x640``: rows x columns) -> (H, W); None stays None (dynamic frame size)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise EdgehebbError(f"--frame-size must be HEIGHTxWIDTH with positive integers (e.g. 480x640), got {text!r}")
    return int(m[1]), int(m[2])


@click.command("export")
@click.argument("model")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--preprocess", type=click.Choice(["none", "uint8-nhwc"]), default="none",
              help="none: input 'images' float32 NCHW RGB in [0, 1] at the model's size; uint8-nhwc: input "
                   "'frames' uint8 NHWC camera frames, converted and resized inside the graph.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb",
              help="Channel order of uint8 frames (OpenCV delivers BGR).")
@click.option("--frame-size", default=None, metavar="HxW",
              help="Fixed frame size for uint8-nhwc, e.g. 480x640 [default: dynamic height and width].")
@click.option("--fit", type=click.Choice(["resize", "center-crop"]), default="resize",
              help="How frames reach the model's size: resize the whole frame, or crop the centred region "
                   "with the model's aspect ratio first.")
@click.option("--opset", type=int, default=17, help="ONNX opset of the standard ops (17 or newer).")
@click.option("--standard-ops", is_flag=True,
              help="Write standard ONNX ops only (the custom op inlined, constants folded), for OpenCV DNN and "
                   "other clients that ignore local functions. With uint8-nhwc it needs --frame-size.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (OUT with suffix .engine).")
@click.option("--fp16", is_flag=True, help="With --trt: allow FP16 (the patch-norm/power op stays FP32).")
@click.option("--batch", default=None, metavar="MIN,OPT,MAX",
              help="With --trt: batch sizes of the optimisation profile, e.g. 1,1,8 "
                   f"[default: {','.join(map(str, TRT_BATCH))}].")
@click.option("--workspace-mib", type=click.IntRange(min=1), default=None,
              help="With --trt: builder workspace limit in MiB [default: 1024].")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --trt: timing cache file, read if present and updated (faster rebuilds).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.pass_context
def export(ctx, model, out, preprocess, channel_order, frame_size, fit, opset, standard_ops, trt, fp16, batch,
           workspace_mib, timing_cache, as_json):
    """Export MODEL (a model directory or shipped model name) to ONNX, optionally to a TensorRT engine.

    Each NNL-CONV block becomes one ai.edgehebb::PatchNormPowReLU node whose standard-op definition
    ships inside the file (export/OP_SPEC.md), so ONNX Runtime and TensorRT run it as is. With
    --standard-ops the definition is inlined instead, for OpenCV DNN and other ONNX clients.
    """
    if out.suffix.lower() != ".onnx":  # --trt writes OUT with .engine beside it; Runtime picks a backend by suffix
        raise EdgehebbError(f"--out must name a .onnx file, got {out}")
    from edgehebb.io import check_writable

    check_writable(out)
    size = parse_frame_size(frame_size)
    trt_only = given(ctx, {"fp16": "--fp16", "batch": "--batch", "workspace_mib": "--workspace-mib",
                           "timing_cache": "--timing-cache"})
    if not trt and trt_only:
        raise EdgehebbError(f"{', '.join(trt_only)} only apply with --trt")
    profile = parse_batch(batch) if batch is not None else None  # validated before the (slower) export
    if fp16 and standard_ops:   # tensorrt_engine finds the op's layers by the ai.edgehebb nodes, gone here
        raise EdgehebbError("--fp16 needs the default (custom-op) export: in a --standard-ops file TensorRT cannot "
                            "tell the patch-norm/power op's layers apart to keep them FP32 (cos^40 underflows FP16)")
    if trt:   # what TensorRT would refuse, refused before the ONNX file is written
        if preprocess == "uint8-nhwc" and size is None:
            raise EdgehebbError("--trt with --preprocess uint8-nhwc needs --frame-size HxW: a TensorRT engine with "
                                "baked-in preprocessing takes frames of one fixed size")
        from edgehebb.deploy.tensorrt_engine import preflight

        preflight(fp16)

    from edgehebb.deploy.onnx_export import export_onnx

    path = export_onnx(model, out, preprocess=preprocess, channel_order=channel_order, frame_size=size,
                       fit=fit, opset=opset, standard_ops=standard_ops)
    result = {"onnx": str(path), "bytes": path.stat().st_size, "preprocess": preprocess, "opset": opset,
              "ops": "standard" if standard_ops else "custom"}
    if trt:
        from edgehebb.io import read_json
        from edgehebb.deploy.tensorrt_engine import build_engine
        from edgehebb.deploy.tensorrt_plan import sidecar_path

        engine = path.with_suffix(".engine")
        # options left out keep build_engine's own defaults
        chosen = {"batch": profile, "workspace_mib": workspace_mib, "timing_cache": timing_cache}
        build_engine(path, engine, fp16=fp16, **{k: v for k, v in chosen.items() if v is not None})
        result["engine"] = str(engine)
        sidecar = read_json(sidecar_path(engine))
        result["trt"] = {"sidecar": str(sidecar_path(engine)),
                         **{k: sidecar.get(k) for k in ("tensorrt", "precision", "profile", "device")}}
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"wrote {path} ({result['bytes']:,} bytes)")
        if trt:
            click.echo(f"wrote {result['engine']}")
