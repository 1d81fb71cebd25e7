#!/usr/bin/env python3
"""Static instruction mix of edgehebb's CUDA kernels, without a GPU: registers, spills and the loops.

Compiles a kernel with the -D constants its planner chooses for one configuration (nvcc -cubin), turns
the cubin into SASS (cuobjdump + nvdisasm) and reports, as one JSON object, the registers and spills
and every loop (a backward branch) with its instruction count, FFMAs and most frequent opcodes. It is
a reading aid for kernel changes on a machine without a GPU: instruction counts are not times, and
every speed claim still needs tools/bench_learn.py or tools/gpu_inference_check.py on a GPU.

Needs nvcc, and cuobjdump and nvdisasm (on PATH, or `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm`, found in site-packages).

Examples:
  python tools/sass_mix.py fused --model fig2_left-cifar10
  python tools/sass_mix.py learn --kernel 8 --batch 100000 --min-ffma 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgehebb.resources import cuda_source  # noqa: E402

H100 = {"sms": 132, "shared_limit": 232448}   # the lent machine's SMs and opt-in shared memory per block
_INS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def find_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for path in Path(base).glob(f"nvidia/cu*/bin/{name}"):
            return str(path)
    sys.exit(f"error: {name} not found: put it on PATH or pip install nvidia-cuda-{name}")


def plan_options(args) -> tuple[str, list[str]]:
    if args.kind == "learn":
        from edgehebb.learn.pycuda_backend import kernel_plan

        plan = kernel_plan(filters=args.filters, dim=3 * args.kernel ** 2, channels=3, kernel=args.kernel, stride=1,
                           rank=2, power=2.0, preprocess="center-unit", batch=args.batch, rank_by=args.rank_by,
                           **H100)
        return "hebbian_step.cu", plan.options
    from edgehebb.nnl.model import load_model
    from edgehebb.deploy.fused import fused_plan

    net, _ = load_model(args.model)
    plan = fused_plan(net.spec.blocks[args.block], net.spec.input, shared_limit=H100["shared_limit"])
    return "nnl_forward.cu", plan.options


def sass(kernel_file: str, options: list[str], arch: str) -> tuple[str, str]:
    """(ptxas -v output, SASS text) of the kernel compiled with ``options``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp, kernel_file), Path(tmp, "k.cubin")
        src.write_text(cuda_source(kernel_file))
        built = subprocess.run([find_tool("nvcc"), f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                                str(src), *options], capture_output=True, text=True)
        if built.returncode:
            sys.exit(f"error: nvcc failed:\n{built.stderr}")
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(find_tool("nvdisasm")).parent), os.environ["PATH"]])}
        dump = subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, env=env)
        if dump.returncode:
            sys.exit(f"error: cuobjdump failed:\n{dump.stderr}")
        return built.stderr, dump.stdout


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def loops(sass_text: str, min_ffma: int) -> list[dict]:
    """Every backward branch's body: [target, branch] by address, innermost first within a nest."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INS.match, sass_text.splitlines()) if m]
    out = []
    for at, text in ins:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            start = int(target.group(1), 16)
            ops = Counter(opcode(t) for a, t in ins if start <= a <= at)
            if ops["FFMA"] >= min_ffma:
                n = sum(ops.values())
                out.append({"start": hex(start), "end": hex(at), "instructions": n, "ffma": ops["FFMA"],
                            "ffma_share": round(ops["FFMA"] / n, 3), "top": dict(ops.most_common(8))})
    return sorted(out, key=lambda d: (int(d["start"], 16), -int(d["end"], 16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples:")[1])
    ap.add_argument("kind", choices=["learn", "fused"])
    ap.add_argument("--kernel", type=int, default=4, help="learn: patch width W (K=400, C=3, rank 2, p=2)")
    ap.add_argument("--filters", type=int, default=400, help="learn: K")
    ap.add_argument("--batch", type=int, default=100000, help="learn: minibatch B (it picks the tile shape)")
    ap.add_argument("--rank-by", choices=["current", "cosine"], default="current", help="learn: the ranking (RANK_COS)")
    ap.add_argument("--model", default="fig2_left-cifar10", help="fused: a model directory or shipped model")
    ap.add_argument("--block", type=int, default=0, help="fused: which block of the model")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--min-ffma", type=int, default=0, help="report only loops with at least this many FFMAs")
    args = ap.parse_args()
    kernel_file, options = plan_options(args)
    ptxas, text = sass(kernel_file, options, args.arch)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", ptxas)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", ptxas)]
    body = [opcode(t) for t in (m.group(2) for m in map(_INS.match, text.splitlines()) if m)]
    print(json.dumps({"kernel": kernel_file, "arch": args.arch, "defines": options, "registers": regs,
                      "spill_store_bytes": spills, "instructions": len(body), "ffma": body.count("FFMA"),
                      "loops": loops(text, args.min_ffma)}, indent=1))


if __name__ == "__main__":
    main()
