#!/usr/bin/env python3
"""How close is each ONNX client to the torch reference on real images? (export/OP_SPEC.md's table)

Exports MODEL twice (the default custom-op file and ``--standard-ops``) into a temporary folder, runs
the first LIMIT class-balanced CIFAR-10 test images through every client that is installed, and
compares the logits with the model evaluated in float64 torch: the worst |difference| as a fraction of
its row's largest |logit| (the acceptance of OP_SPEC.md is 1e-4), and top-1 agreement. onnx's
reference evaluator is slow in pure numpy, so it sees only the first REF_LIMIT images. Each client
that is missing gives a row saying what to install. Prints one JSON line per (client, file).

  python tools/onnx_parity.py --data $EDGEHEBB_DATA --limit 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgehebb.data import load_split, resolve_data_root
from edgehebb.deploy.frames import frames_to_tensor
from edgehebb.nnl.model import load_model
from edgehebb.deploy.onnx_export import export_onnx
from edgehebb.deploy.op import parity


def compare(got: np.ndarray, ref: torch.Tensor) -> dict:
    return parity(got, ref)   # OP_SPEC's metric, from the op's contract


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"images": x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def run_opencv(path: Path, x: np.ndarray) -> np.ndarray:
    import cv2

    cv2.setNumThreads(torch.get_num_threads())
    net = cv2.dnn.readNetFromONNX(str(path))
    out = []
    for i in range(0, len(x), 256):
        net.setInput(x[i:i + 256])
        out.append(net.forward("logits"))
    return np.concatenate(out)


def run_reference(path: Path, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(["logits"], {"images": x})[0]


CLIENTS = {  # client -> (runner, files it can run, what to install when it is missing)
    "onnxruntime": (run_ort, ("default", "standard-ops"), "onnxruntime"),
    "opencv-dnn": (run_opencv, ("standard-ops",), "opencv-python-headless>=5.0"),
    "onnx-reference": (run_reference, ("default", "standard-ops"), "onnx"),
}


def version(client: str) -> str:
    module = {"onnxruntime": "onnxruntime", "opencv-dnn": "cv2", "onnx-reference": "onnx"}[client]
    return __import__(module).__version__


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fig2_left-cifar10", help="Model directory or shipped model name.")
    ap.add_argument("--data", default=os.environ.get("EDGEHEBB_DATA"), help="CIFAR-10 [default: $EDGEHEBB_DATA]")
    ap.add_argument("--limit", type=int, default=1000, help="Test images for ONNX Runtime and OpenCV.")
    ap.add_argument("--ref-limit", type=int, default=20, help="Test images for onnx's reference evaluator.")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch, ORT and OpenCV.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    net, _ = load_model(args.model)   # the model first: a bad file fails before any image is decoded
    reference = copy.deepcopy(net).double().eval()
    test = load_split(resolve_data_root(args.data, download=False), "test", limit=args.limit, progress=False)
    x = frames_to_tensor(np.asarray(test.x))
    with torch.no_grad():
        ref = reference(x.double())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"default": export_onnx(args.model, Path(tmp) / "default.onnx"),
                 "standard-ops": export_onnx(args.model, Path(tmp) / "standard.onnx", standard_ops=True)}
        for client, (runner, forms, package) in CLIENTS.items():
            for form in forms:
                row = {"client": client, "file": form, "model": str(args.model), "threads": args.threads}
                n = args.ref_limit if client == "onnx-reference" else len(x)
                try:
                    row["version"] = version(client)
                    got = runner(files[form], x[:n].numpy())
                except ImportError:
                    row["skipped"] = f"not installed: pip install {package}"
                else:
                    row.update(images=n, **compare(got, ref[:n]))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
