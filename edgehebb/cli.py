"""The ``edgehebb`` command line: thin Click commands over the library.

User mistakes raise ``EdgehebbError`` anywhere in the library; ``main`` prints them as one
``Error: ...`` line and exits 1 (``--debug`` keeps the traceback). Results go to stdout (``--json``),
progress and logs to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgehebb import __version__
from edgehebb.errors import EdgehebbError

DEVICES = click.Choice(["auto", "cpu", "cuda"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="edgehebb")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Learn convolutional filters with a local Hebbian rule and ship them to edge GPUs."""
    ctx.obj = {"debug": debug}


def data_option(f):
    return click.option("--data", "data", type=click.Path(path_type=Path), default=None,
                        help="Image-folder tree, cifar-10-batches-py folder or .npz "
                             "[default: $EDGEHEBB_DATA, else ~/.cache/edgehebb/cifar10]")(f)


@cli.command()
@data_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@click.option("--filters", "-K", type=click.IntRange(min=1), default=400, help="Number of filters K.")
@click.option("--kernel", "-W", type=click.IntRange(min=1), default=4, help="Filter size W (W x W x C patches).")
@click.option("--stride", type=click.IntRange(min=1), default=1, help="Step between patch positions.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over all patches; eps anneals to 0 over them.")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1000, help="Patches per minibatch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.02, help="Initial learning rate eps0.")
@click.option("--power", "-p", type=click.FloatRange(min=1), default=2.0, help="Lebesgue power p of the currents (2: dot product).")
@click.option("--delta", type=click.FloatRange(min=0), default=0.4, help="Anti-Hebbian strength for the rank-m unit.")
@click.option("--rank", "-m", type=click.IntRange(min=2), default=2, help="Rank m of the unit pushed away.")
@click.option("--preprocess", type=click.Choice(["none", "center", "unit", "center-unit"]), default="center-unit",
              help="Per-patch preprocessing before learning (none: raw [0, 1] pixels, which collapse most units).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N training images.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--backend", type=click.Choice(["auto", "torch", "pycuda"]), default="auto",
              help="torch (CPU or CUDA), pycuda (our CUDA kernel), auto (pycuda when usable).")
@click.option("--device", type=DEVICES, default="auto", help="Device of the torch backend.")
@click.option("--seed", type=int, default=0, help="Seeds the initial weights and every epoch's shuffle.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON on stdout.")
def learn(data, out, filters, kernel, stride, epochs, batch, lr, power, delta, rank, preprocess, limit, skip_bad,
          backend, device, seed, resume, as_json):
    """Learn a filter bank from image patches with the Krotov-Hopfield rank-update rule."""
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.learn import LearnConfig
    from edgehebb.learn_dir import learn_to_dir

    root = resolve_data_root(data)
    train = load_split(root, "train", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(train)} images {train.x.shape[1:]} from {train.source}", err=True)
    config = LearnConfig(filters=filters, kernel=kernel, stride=stride, epochs=epochs, batch=batch, lr=lr,
                         power=power, delta=delta, rank=rank, preprocess=preprocess, seed=seed)
    data_key = {"source": train.source, "split": "train", "limit": limit, "images": len(train)}
    summary = learn_to_dir(train.x, config, out, data_key=data_key, backend=backend, device=device, resume=resume)
    _report_filters(out, summary["colour_orientation"], summary, as_json)


@cli.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write [default: MODEL_DIR/filters.png].")
@click.option("--json", "as_json", is_flag=True, help="Print the colour/orientation statistic as JSON.")
def show(model_dir, out, as_json):
    """Redraw the filter picture of a learned model directory."""
    from edgehebb.io import load_filters
    from edgehebb.viz import colour_orientation_summary, save_filter_png

    filters, _ = load_filters(model_dir)
    stats = colour_orientation_summary(filters)
    png = out or model_dir / "filters.png"
    save_filter_png(filters, png, title=f"{filters.shape[0]} filters, W={filters.shape[2]}, "
                    f"{stats['colour_units']} colour / {stats['bw_units']} black-and-white")
    _report_filters(png, stats, stats, as_json)


def _report_filters(where: Path, stats: dict, payload: dict, as_json: bool) -> None:
    click.echo(f"wrote {where}", err=True)
    click.echo(f"colour units {stats['colour_units']}, black-and-white {stats['bw_units']}; mean orientation "
               f"selectivity {stats['orientation_of_colour_units']:.2f} (colour) vs "
               f"{stats['orientation_of_bw_units']:.2f} (b/w); corr {stats['corr_colour_orientation']:+.2f}", err=True)
    if as_json:
        click.echo(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per user error, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="edgehebb", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgehebbError as e:
        if "--debug" in args:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
