"""``edgehebb learn`` and ``edgehebb show``: learn a filter bank; draw a bank's or a model's filters."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgehebb.cli.options import DEVICES, SEEDS, data_option, skipped_record, threads_option

@click.command()
@data_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@click.option("--filters", "-K", type=click.IntRange(min=1), default=400, help="Number of filters K.")
@click.option("--kernel", "-W", type=click.IntRange(min=1), default=4, help="Filter size W (W x W x C patches).")
@click.option("--stride", type=click.IntRange(min=1), default=1, help="Step between patch positions.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over all patches; eps anneals to 0 over them.")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1000, help="Patches per minibatch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.02, help="Initial learning rate eps0.")
@click.option("--power", "-p", type=click.FloatRange(min=1), default=2.0, help="Lebesgue power p of the currents (2: dot product).")
@click.option("--delta", type=click.FloatRange(min=0), default=0.2,
              help="Anti-Hebbian strength for the rank-m unit (on plain patches 0.3 and more pushed every unit away).")
@click.option("--rank", "-m", type=click.IntRange(min=2), default=2, help="Rank m of the unit pushed away.")
@click.option("--preprocess", type=click.Choice(["none", "center", "unit", "center-unit"]), default="unit",
              help="Per-patch preprocessing before learning: unit is the paper's patch norm (the models' blocks "
                   "with center=false); center-unit also subtracts the patch mean (blocks with center=true); "
                   "none: raw [0, 1] pixels, which collapse most units.")
@click.option("--init", type=click.Choice(["normal", "patches"]), default="patches",
              help="Starting rows: K distinct (preprocessed, unit) data patches, or standard normal (the paper).")
@click.option("--rank-by", type=click.Choice(["current", "cosine"]), default="cosine",
              help="Rank units by their current, or by their cosine with the patch (the ranking the rule "
                   "converges to; needed for --preprocess unit, whose patches lie in a narrow cone).")
@click.option("--whiten", type=click.FloatRange(min=0), default=0.0,
              help="Learn on whitened patches (ZCA of unit patches, no mean subtracted), with this regulariser "
                   "relative to the mean eigenvalue (0.1 validated best; 0.3 holds up under sensor noise); the bank then carries its whitening "
                   "for blocks with \"whiten\" in their spec. 0: plain patches.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N training images.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--backend", type=click.Choice(["auto", "torch", "pycuda"]), default="auto",
              help="torch (CPU or CUDA), pycuda (our CUDA kernel, either --rank-by), auto (pycuda when usable, "
                   "unless --device cpu).")
@click.option("--device", type=DEVICES, default="auto", help="Device of the torch backend.")
@click.option("--seed", type=SEEDS, default=0, help="Seeds the initial weights and every epoch's shuffle.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (written every "
              "epoch, every few minutes and on Ctrl-C).")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON on stdout.")
def learn(data, out, filters, kernel, stride, epochs, batch, lr, power, delta, rank, preprocess, init, rank_by, whiten, limit,
          skip_bad, backend, device, seed, resume, threads, as_json):
    """Learn a filter bank from image patches with the Krotov-Hopfield rank-update rule."""
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.learn.loop import LearnConfig
    from edgehebb.learn.directory import check_out, learn_to_dir

    config = LearnConfig(filters=filters, kernel=kernel, stride=stride, epochs=epochs, batch=batch, lr=lr,
                         power=power, delta=delta, rank=rank, preprocess=preprocess, seed=seed, init=init,
                         rank_by=rank_by, whiten=whiten)
    check_out(out, resume)   # before the data is decoded, not after the epoch
    root = resolve_data_root(data)
    train = load_split(root, "train", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(train)} images {train.x.shape[1:]} from {train.source}", err=True)
    data_key = {"source": train.source, "split": "train", "limit": limit, "images": len(train)}
    summary = learn_to_dir(train.x, config, out, data_key=data_key, backend=backend, device=device, resume=resume,
                           threads=threads, extra=skipped_record(train))
    _report_filters(out, summary["colour_orientation"], summary, as_json)


@click.command()
@click.argument("model_dir")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write [default: MODEL_DIR/filters.png; a model of several blocks gets one PNG per "
                   "block, filters-block1.png, ...].")
@click.option("--json", "as_json", is_flag=True, help="Print the colour/orientation statistic as JSON.")
def show(model_dir, out, as_json):
    """Draw the filters of a filter bank or a trained model, and print the colour/orientation statistic.

    MODEL_DIR is a directory written by `edgehebb learn` or `edgehebb train`, or a shipped model's name.
    """
    from edgehebb.io import check_writable
    from edgehebb.nnl.model import model_filters
    from edgehebb.viz import colour_orientation_summary, save_filter_png

    banks, where = model_filters(model_dir)
    base = out or where / "filters.png"
    pngs = [base] if len(banks) == 1 else [base.with_name(f"{base.stem}-block{i}{base.suffix}")
                                            for i in range(len(banks))]
    for png in pngs:
        check_writable(png)
    all_stats = []
    for (label, filters), png in zip(banks, pngs):
        stats = colour_orientation_summary(filters)
        save_filter_png(filters, png, title=f"{label}{filters.shape[0]} filters, W={filters.shape[2]}, "
                        f"{stats['colour_units']} colour / {stats['bw_units']} black-and-white")
        _report_filters(png, stats, None, False)
        all_stats.append(stats)
    if as_json:
        click.echo(json.dumps(all_stats[0] if len(all_stats) == 1 else all_stats, indent=2))



def _report_filters(where: Path, stats: dict, payload: dict | None, as_json: bool) -> None:
    click.echo(f"wrote {where}", err=True)
    def num(x, fmt=".2f"):
        return "n/a" if x is None else format(x, fmt)

    click.echo(f"colour units {stats['colour_units']}, black-and-white {stats['bw_units']}; mean orientation "
               f"selectivity {num(stats['orientation_of_colour_units'])} (colour) vs "
               f"{num(stats['orientation_of_bw_units'])} (b/w); corr {num(stats['corr_colour_orientation'], '+.2f')}",
               err=True)
    if as_json:
        click.echo(json.dumps(payload, indent=2))


