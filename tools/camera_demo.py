#!/usr/bin/env python3
"""Classify every frame of a video file or webcam with an edgehebb model and write the annotated video.

Each frame goes through edgehebb.Runtime (the interface a camera pipeline uses) as OpenCV delivers it,
BGR uint8 (channel_order="bgr"); the frame is written back with the predicted class, its probability
and two frame rates: the model's (Runtime.predict alone, smoothed) and the whole loop's (decode,
predict, draw, encode). A summary JSON line goes to stdout when the video ends, at --max-frames or on
Ctrl-C. Needs OpenCV, which the package's ``demo`` extra brings: pip install -e '.[demo]' in a clone
(pip install 'edgehebb[demo]' from a wheel).

Examples:
  python tools/camera_demo.py --source clip.mp4 --out annotated.mp4
  python tools/camera_demo.py --source 0 --max-frames 300 --out webcam.avi
  python tools/camera_demo.py --source clip.mp4 --model model.onnx --backend onnxruntime --out ort.mp4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgehebb.errors import EdgehebbError  # noqa: E402

DEFAULT_MODEL = "fig2_left-cifar10"
CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v"}
SMOOTHING = 0.9   # exponential moving average of the frame rates, so the overlay does not flicker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from edgehebb.nnl.model import shipped_models

    shipped = DEFAULT_MODEL in shipped_models()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="0", help="Video file, or webcam index (0 = first camera). Default: 0")
    p.add_argument("--out", type=Path, required=True, help=f"Annotated video to write ({', '.join(CODECS)}).")
    p.add_argument("--model", default=DEFAULT_MODEL if shipped else None, required=not shipped,
                   help="Model directory, shipped model name, .onnx or .engine file."
                        + (f" Default: {DEFAULT_MODEL}" if shipped else f" (required: {DEFAULT_MODEL} is not shipped here)"))
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "opencv", "tensorrt"], default="auto",
                   help="Runtime backend; auto picks it from --model; opencv runs the model with OpenCV DNN "
                        "alone (CPU). Default: auto")
    p.add_argument("--device", default=None, help="cpu or cuda. Default: CUDA when the backend can use it.")
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize",
                   help="How a frame meets the model's aspect ratio. Default: resize")
    p.add_argument("--max-frames", type=int, default=None, help="Stop after this many frames. Default: all")
    return p.parse_args(argv)


def import_cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def open_source(cv2, source: str):
    if source.isdigit():
        cap = cv2.VideoCapture(int(source))
    else:
        if not Path(source).is_file():
            raise EdgehebbError(f"--source {source} is neither a file nor a webcam index")
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise EdgehebbError(f"OpenCV cannot open --source {source}")
    return cap


def open_writer(cv2, out: Path, fps: float, width: int, height: int):
    codec = CODECS.get(out.suffix.lower())
    if codec is None:
        raise EdgehebbError(f"--out {out}: unknown video type; use one of {', '.join(CODECS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise EdgehebbError(f"OpenCV cannot write {out} with codec {codec}")
    return writer


def annotate(cv2, frame, lines: list[str]) -> None:
    """White text on a dark band in the top-left corner, scaled to the frame (small frames get small text)."""
    scale = max(0.3, min(frame.shape[:2]) / 400)
    thick = max(1, round(scale * 2))
    step = int(26 * scale) + 4
    width = max(cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for s in lines)
    cv2.rectangle(frame, (0, 0), (width + 8, step * len(lines) + 4), (0, 0, 0), -1)
    for i, s in enumerate(lines):
        cv2.putText(frame, s, (4, step * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)


def run(cv2, args: argparse.Namespace) -> dict:
    from edgehebb.deploy.runtime import Runtime

    cap = open_source(cv2, args.source)
    writer = None
    model_ms, frames, fps_model, fps_loop, used = [], 0, None, None, {}
    try:
        with Runtime(args.model, args.backend, args.device, channel_order="bgr", fit=args.fit) as rt:
            used = {"backend": rt.backend, "device": rt.device}
            print(f"{rt!r}: {len(rt.classes)} classes, input {rt.input_size[0]}x{rt.input_size[1]}", file=sys.stderr)
            last = time.perf_counter()
            while args.max_frames is None or frames < args.max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                if writer is None:   # the first frame fixes the size; a webcam's FPS property may be 0
                    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
                    writer = open_writer(cv2, args.out, fps, frame.shape[1], frame.shape[0])
                t0 = time.perf_counter()
                pred = rt.predict(frame)
                dt = time.perf_counter() - t0
                model_ms.append(dt * 1e3)
                now = time.perf_counter()
                fps_model = 1 / dt if fps_model is None else SMOOTHING * fps_model + (1 - SMOOTHING) / dt
                loop = max(now - last, 1e-9)
                fps_loop = 1 / loop if fps_loop is None else SMOOTHING * fps_loop + (1 - SMOOTHING) / loop
                last = now
                annotate(cv2, frame, [f"{pred.names[0]} {pred.probabilities[0].max():.0%}",
                                      f"{fps_model:.0f} FPS model, {fps_loop:.0f} FPS loop ({rt.backend} {rt.device})"])
                writer.write(frame)
                frames += 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)   # keep what was written: the writer is released below
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise EdgehebbError(f"--source {args.source} gave no frames")
    ms = sorted(model_ms)
    return {"frames": frames, "out": str(args.out), "model": str(args.model), **used,
            "model_ms_p50": ms[len(ms) // 2], "model_ms_max": ms[-1]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2 = import_cv2()
    if cv2 is None:
        print("Error: camera_demo needs OpenCV (opencv-python-headless), which the demo extra installs: "
              "pip install -e '.[demo]' in the clone", file=sys.stderr)
        return 2
    try:
        summary = run(cv2, args)
    except EdgehebbError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    print(f"wrote {summary['frames']} frames to {summary['out']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
