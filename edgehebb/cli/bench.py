"""``edgehebb bench``: accuracy and latency of one model on every backend (a thin command over edgehebb.deploy.bench).

Only click and the standard library load with this module, so ``edgehebb --help`` stays fast; cli.py
registers the command with ``cli.add_command(bench)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

BACKEND_NAMES = ("torch", "torch-cuda", "onnxruntime", "onnxruntime-cuda", "opencv", "tensorrt")   # = edgehebb.deploy.bench.BACKENDS


def _backends(ctx, param, value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {','.join(BACKEND_NAMES)}")
    return list(dict.fromkeys(names))


def _batches(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected comma-separated batch sizes >= 1 (e.g. 1,32,256), got {value!r}")
    return list(dict.fromkeys(sizes))


@click.command(context_settings={"show_default": True})
@click.argument("model")
@click.option("--data", "data", type=click.Path(path_type=Path), default=None,
              help="Image-folder tree, cifar-10-batches-py folder or .npz "
                   "[default: $EDGEHEBB_DATA, else ~/.cache/edgehebb/cifar10]")
@click.option("--backends", default=",".join(BACKEND_NAMES), callback=_backends,
              help="Comma-separated backends; those that cannot run here are reported as skipped.")
@click.option("--batch", "batches", default="1,32,256", callback=_batches, help="Comma-separated batch sizes to time.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N test images.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, help="Untimed iterations per backend and batch.")
@click.option("--iters", type=click.IntRange(min=1), default=50, help="Timed iterations per backend and batch (at most).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=2.0,
              help="Time bound of each timing loop: it stops after this once it has 3 timed calls.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of every backend [default: each engine's own].")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw latency per backend and batch, and clean vs shadowed accuracy, into this PNG "
                   "[default: no picture].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout.")
def bench(model, data, backends, batches, limit, warmup, iters, seconds, threads, skip_bad, png, as_json):
    """Accuracy (clean and shadowed) and latency of MODEL on each backend.

    MODEL is a model directory, a shipped model name, a .onnx file (custom-op or --standard-ops) or a
    TensorRT .engine file. Every backend runs through edgehebb.Runtime, the interface camera pipelines
    use. A model exported for one --frame-size gets the test images resized to that size.
    """
    from edgehebb.deploy.bench import run_bench, save_bench_png
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.io import check_writable
    from edgehebb.deploy.op import read_metadata
    from edgehebb.deploy.runtime import resolve_target

    # a wrong, corrupt or foreign MODEL, or an unwritable --png, fails before the test set is decoded
    kind, target = resolve_target(model)
    if kind == "model":
        from edgehebb.nnl.model import load_model

        load_model(target)   # config.json, the spec and the tensors' checksum
    elif kind == "onnx":
        read_metadata(target)
    if png is not None:
        check_writable(png)
    test = load_split(resolve_data_root(data), "test", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(test)} test images from {test.source}", err=True)
    result = run_bench(model, test, backends=backends, batches=batches, warmup=warmup, iters=iters, seconds=seconds,
                       threads=threads, log=lambda line: click.echo(line, err=True),
                       progress=lambda line: click.echo(f"  {line}", err=True))
    if as_json:  # first: the numbers are the result, the chart only shows them
        click.echo(json.dumps(result, indent=2))
    if png is not None:
        save_bench_png(result, png)
        click.echo(f"wrote {png}", err=True)
