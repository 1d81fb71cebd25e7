#!/usr/bin/env python3
"""How close is each ONNX client to the torch reference on real images? (export/OP_SPEC.md's table)

Exports MODEL twice (the default custom-op file and ``--standard-ops``) into a temporary folder, runs
the first LIMIT class-balanced CIFAR-10 test images through every client that is installed, and
compares the logits with the model evaluated in float64 torch: the worst |difference| as a fraction of
its row's largest |logit| (the acceptance of OP_SPEC.md is 1e-4), and top-1 agreement. onnx's
reference evaluator is slow in pure numpy, so it sees only the first REF_LIMIT images. Prints one
JSON line per (client, file).

Every client in --clients (default: all three) must be importable: a missing one stops the tool
before any work with one line naming what to install (or to leave it out of --clients), never a
half-empty table. onnxruntime and onnx come with edgehebb; OpenCV with its demo and test extras.

  python tools/onnx_parity.py --data $EDGEHEBB_DATA --limit 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgehebb.data import load_split, resolve_data_root
from edgehebb.deploy.frames import frames_to_tensor
from edgehebb.nnl.model import load_model
from edgehebb.deploy.onnx_export import export_onnx
from edgehebb.deploy.op import parity
from edgehebb.errors import EdgehebbError, require
from edgehebb import threads as thread_policy


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

    saved = cv2.getNumThreads()
    cv2.setNumThreads(torch.get_num_threads())
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
        out = []
        for i in range(0, len(x), 256):
            net.setInput(x[i:i + 256])
            out.append(net.forward("logits"))
    finally:
        cv2.setNumThreads(saved)   # a caller's own OpenCV setting (main() is also called from Python)
    return np.concatenate(out)


def run_reference(path: Path, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(["logits"], {"images": x})[0]


CLIENTS = {  # client -> (runner, files it can run, module, what pip installs)
    "onnxruntime": (run_ort, ("default", "standard-ops"), "onnxruntime", "onnxruntime"),
    "opencv-dnn": (run_opencv, ("standard-ops",), "cv2", "opencv-python-headless>=5.0"),
    "onnx-reference": (run_reference, ("default", "standard-ops"), "onnx", "onnx"),
}


def clients(text: str) -> dict[str, str]:
    """The clients named in --clients, each imported: {client: version}; a missing one is an error."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CLIENTS]
    if unknown or not names:
        raise EdgehebbError(f"--clients {text!r}: choose from {', '.join(CLIENTS)}")
    versions = {}
    for name in names:
        _, _, module, package = CLIENTS[name]
        others = ",".join(c for c in names if c != name)
        why = f"for the {name} rows; leave it out with --clients {others}" if others else f"for the {name} rows"
        versions[name] = require(module, package=package, why=why).__version__
    return versions


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fig2_left-cifar10", help="Model directory or shipped model name.")
    ap.add_argument("--data", default=os.environ.get("EDGEHEBB_DATA"), help="CIFAR-10 [default: $EDGEHEBB_DATA]")
    ap.add_argument("--limit", type=int, default=1000, help="Test images for ONNX Runtime and OpenCV.")
    ap.add_argument("--ref-limit", type=int, default=20, help="Test images for onnx's reference evaluator.")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch, ORT and OpenCV.")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="Comma-separated clients to compare, each of which "
                    f"must be installed [default: {','.join(CLIENTS)}].")
    args = ap.parse_args(argv)
    versions = clients(args.clients)   # before any work: a missing client costs nothing
    with thread_policy.configured(args.threads):   # and back after: main() is also called from Python
        return _compare(args, versions)


def _compare(args: argparse.Namespace, versions: dict[str, str]) -> list[dict]:
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
        for client, version in versions.items():
            runner, forms, _, _ = CLIENTS[client]
            n = args.ref_limit if client == "onnx-reference" else len(x)
            for form in forms:
                row = {"client": client, "file": form, "model": str(args.model), "threads": args.threads,
                       "version": version, "images": n, **compare(runner(files[form], x[:n].numpy()), ref[:n])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    try:
        main()
    except EdgehebbError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
