"""``edgehebb export``: a trained model to ONNX (and, with ``--trt``, a TensorRT engine), or into a Triton
Inference Server model repository (``--triton REPO``, :mod:`edgehebb.deploy.triton_repo`).

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
# edgehebb.deploy.triton_repo's defaults, likewise (a test keeps them equal)
TRITON_MAX_BATCH, TRITON_PREFERRED, TRITON_QUEUE_DELAY_US = 64, (8, 16, 32), 1000
TRITON_ONLY = {"triton_backend": "--triton-backend", "name": "--name", "max_batch_size": "--max-batch-size",
               "preferred_batch_sizes": "--preferred-batch-sizes", "max_queue_delay_us": "--max-queue-delay-us",
               "instances": "--instances", "tensorrt_accelerator": "--tensorrt-accelerator"}
ONNX_FILE_ONLY = {"preprocess": "--preprocess", "standard_ops": "--standard-ops", "trt": "--trt"}


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


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"8,16,32"`` -> (8, 16, 32); ``""`` or ``"none"`` -> () (no preferred size)."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) and int(p) >= 1 for p in parts):
        raise EdgehebbError(f"--preferred-batch-sizes must be positive integers separated by commas (e.g. 8,16), "
                            f"or none; got {text!r}")
    return tuple(int(p) for p in parts)


@click.command("export")
@click.argument("model")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX file to write (required unless --triton is given).")
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
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="REPO", help="Write the model into this Triton Inference Server model repository as "
                                   "REPO/NAME/config.pbtxt, REPO/NAME/labels.txt and REPO/NAME/1/ (uint8 NHWC frames "
                                   "in; --frame-size, --channel-order and --fit apply).")
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
              help="With --triton: onnxruntime (a full Triton install, GPU or CPU) or python (a model.py running the "
                   "ONNX file with ONNX Runtime, for servers without the onnxruntime backend, such as `edgehebb serve` "
                   "with the nvidia-pytriton wheel).")
@click.option("--name", default=None, help="With --triton: the model's name in the repository [default: MODEL's "
                                           "folder name].")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=TRITON_MAX_BATCH,
              help="With --triton: the largest batch the server forms.")
@click.option("--preferred-batch-sizes", default=",".join(map(str, TRITON_PREFERRED)), metavar="N,N,...",
              help="With --triton: batch sizes the dynamic batcher waits for (up to --max-queue-delay-us); none: "
                   "run whatever has arrived.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=TRITON_QUEUE_DELAY_US,
              help="With --triton: how long a request may wait for others to join its batch, in microseconds.")
@click.option("--instances", type=click.IntRange(min=1), default=1,
              help="With --triton: model instances (per GPU on a GPU server).")
@click.option("--tensorrt-accelerator", is_flag=True,
              help="With --triton-backend onnxruntime: put ONNX Runtime's TensorRT accelerator first (FP32, a profile "
                   "from 1 to --max-batch-size; needs --frame-size). For GPU servers; not run here.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.pass_context
def export(ctx, model, out, preprocess, channel_order, frame_size, fit, opset, standard_ops, trt, fp16, batch,
           workspace_mib, timing_cache, triton_repo, triton_backend, name, max_batch_size, preferred_batch_sizes,
           max_queue_delay_us, instances, tensorrt_accelerator, as_json):
    """Export MODEL (a model directory or shipped model name) to ONNX, optionally to a TensorRT engine,
    or into a Triton model repository (--triton).

    Each NNL-CONV block becomes one ai.edgehebb::PatchNormPowReLU node whose standard-op definition
    ships inside the file (export/OP_SPEC.md), so ONNX Runtime and TensorRT run it as is. With
    --standard-ops the definition is inlined instead, for OpenCV DNN and other ONNX clients.
    """
    if out is None and triton_repo is None:
        # a required option missing, as click says when --out alone was required: usage text, exit 2
        raise click.UsageError("say where to export: --out FILE.onnx, --triton REPO, or both", ctx)
    if triton_repo is None and (triton_only := given(ctx, TRITON_ONLY)):
        raise EdgehebbError(f"{', '.join(triton_only)} only apply with --triton REPO")
    if out is None and (file_only := given(ctx, ONNX_FILE_ONLY)):
        raise EdgehebbError(f"{', '.join(file_only)} apply to the ONNX file of --out (a Triton repository always "
                            f"takes uint8 frames and the custom-op form)")
    size = parse_frame_size(frame_size)
    preferred = parse_sizes(preferred_batch_sizes)
    # everything --out needs is checked before anything is written
    profile = _check_file(ctx, out, preprocess, size, standard_ops, trt, fp16, batch) if out is not None else None
    result = {}
    if triton_repo is not None:
        from edgehebb.deploy.triton_repo import write_repository

        written = write_repository(model, triton_repo, name=name, backend=triton_backend, channel_order=channel_order,
                                   frame_size=size, fit=fit, opset=opset, max_batch_size=max_batch_size,
                                   preferred_batch_sizes=preferred, max_queue_delay_us=max_queue_delay_us,
                                   instances=instances, tensorrt=tensorrt_accelerator)
        result["triton"] = {k: v for k, v in written.items() if k != "classes"}
        if out is None:
            _report(result, as_json)
            return
    result.update(_export_file(model, out, preprocess, channel_order, size, fit, opset, standard_ops, trt, fp16,
                               profile, workspace_mib, timing_cache))
    _report(result, as_json)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    if "triton" in result:
        t = result["triton"]
        click.echo(f"wrote Triton model {t['name']!r} ({t['backend']} backend) into {t['repository']}: "
                   f"{', '.join(t['files'])}")
    if "onnx" in result:
        click.echo(f"wrote {result['onnx']} ({result['bytes']:,} bytes)")
    if "engine" in result:
        click.echo(f"wrote {result['engine']}")


def _check_file(ctx, out, preprocess, size, standard_ops, trt, fp16, batch) -> tuple[int, int, int] | None:
    """``--out``'s options checked (and TensorRT's presence with ``--trt``); the ``--batch`` profile or None."""
    if out.suffix.lower() != ".onnx":  # --trt writes OUT with .engine beside it; Runtime picks a backend by suffix
        raise EdgehebbError(f"--out must name a .onnx file, got {out}")
    from edgehebb.io import check_writable

    check_writable(out)
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
    return profile


def _export_file(model, out, preprocess, channel_order, size, fit, opset, standard_ops, trt, fp16, profile,
                 workspace_mib, timing_cache) -> dict:
    """``--out``: the ONNX file (and with ``--trt`` the engine); what was written, as export's JSON has it."""
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
    return result
