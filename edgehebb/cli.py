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
CONDITION_NAMES = ("low-light", "wb-warm", "wb-cool", "tint-green", "tint-magenta", "overexposure", "underexposure",
                   "gamma-high", "gamma-low", "gradient", "vignette", "jpeg", "shadow")   # = edgehebb.conditions.CONDITIONS
SEEDS = click.IntRange(0, 2 ** 32 - 1)  # what numpy and torch generators take


class _Group(click.Group):
    """Lists each command with its whole first sentence, wrapped between words (click cuts it to fit
    one line, and its wrapping splits "rank-update" at the hyphen)."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        import textwrap

        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if not rows:
            return
        with formatter.section("Commands"):
            indent = " " * formatter.current_indent
            first = max(len(name) for name, _ in rows) + 2
            width = max(formatter.width - formatter.current_indent - first, 20)
            for name, text in rows:
                lines = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
                formatter.write(f"{indent}{name:<{first}}{lines[0]}\n")
                formatter.write("".join(f"{indent}{'':<{first}}{line}\n" for line in lines[1:]))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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


def threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for learning and features [default: measured as it runs, so that "
                             "cores shared with other jobs do not stall it]")(f)


def _skipped_record(data) -> dict:
    """config.json's list of the image files --skip-bad left out (the log line names only a few)."""
    return {"skipped_images": list(data.skipped)} if data.skipped else {}


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
def learn(data, out, filters, kernel, stride, epochs, batch, lr, power, delta, rank, preprocess, init, rank_by, limit,
          skip_bad, backend, device, seed, resume, threads, as_json):
    """Learn a filter bank from image patches with the Krotov-Hopfield rank-update rule."""
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.learn import LearnConfig
    from edgehebb.learn_dir import check_out, learn_to_dir

    config = LearnConfig(filters=filters, kernel=kernel, stride=stride, epochs=epochs, batch=batch, lr=lr,
                         power=power, delta=delta, rank=rank, preprocess=preprocess, seed=seed, init=init,
                         rank_by=rank_by)
    check_out(out, resume)   # before the data is decoded, not after the epoch
    root = resolve_data_root(data)
    train = load_split(root, "train", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(train)} images {train.x.shape[1:]} from {train.source}", err=True)
    data_key = {"source": train.source, "split": "train", "limit": limit, "images": len(train)}
    summary = learn_to_dir(train.x, config, out, data_key=data_key, backend=backend, device=device, resume=resume,
                           threads=threads, extra=_skipped_record(train))
    _report_filters(out, summary["colour_orientation"], summary, as_json)


@cli.command()
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
    from edgehebb.viz import colour_orientation_summary, model_filters, save_filter_png

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


@cli.command()
@click.option("--spec", default="fig2_left", help="Network spec: a shipped name (fig2_left, fig2_middle) or a JSON file.")
@data_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N training images.")
@click.option("--filters-from", "filters_from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              multiple=True, help="Filter bank or model directory (or a folder of them) to take the blocks' filters "
                                  "from instead of learning them; repeatable.")
@click.option("--sigma", type=click.FloatRange(min=0), default=None,
              help="Semi-saturation constant of every block's patch norm, u = v / (sqrt(|v|^2 + sigma^2) + eps), "
                   "replacing the spec's [default: the spec's, 0 in the shipped specs: the plain norm].")
@click.option("--colour-norm", type=click.Choice(["none", "gray-world"]), default=None,
              help="Colour normalisation of each image before the blocks, replacing the spec's [default: the "
                   "spec's, none in the shipped specs]; gray-world divides each channel by its image mean.")
@click.option("--baseline", is_flag=True, help="Train the spec's standard CONV twin end to end instead.")
@click.option("--baseline-power", type=click.FloatRange(min=1), default=1.0,
              help="--baseline: n in ReLU(x)^n (1: plain ReLU).")
@click.option("--patch-norm", is_flag=True, help="--baseline: keep patch normalisation (cosine blocks, learnable filters).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, show_default=False,
              help="Training epochs; the best validation epoch is kept [default: 60 for the head, 30 with --baseline].")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=256, help="Images per Adam step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, show_default=False,
              help="Adam learning rate [default: 3e-4 for the head, 1e-3 with --baseline].")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, help="Adam weight decay.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              help="Fraction of each class's training images held out to choose the epoch.")
@click.option("--augment", default="", metavar="NAME,...",
              help="Train on images perturbed by these camera conditions (names as in `eval --conditions`; "
                   "each training image outside the validation split, with probability --augment-fraction, "
                   "gets one of them at one of its default severities). Default: none.")
@click.option("--augment-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="With --augment: the share of training images perturbed.")
@click.option("--learn-epochs", type=click.IntRange(min=1), default=1, help="Epochs of `edgehebb learn` for missing banks.")
@click.option("--learn-batch", type=click.IntRange(min=1), default=1000, help="Minibatch of `edgehebb learn` for missing banks.")
@click.option("--backend", type=click.Choice(["auto", "torch", "pycuda"]), default="auto", help="Backend for learning banks.")
@click.option("--device", type=DEVICES, default="auto", help="Device for features and training.")
@click.option("--seed", type=SEEDS, default=0, help="Seeds the validation split, initialisation, shuffles and learning.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the frozen-feature cache.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the training record as JSON on stdout.")
def train(spec, data, out, limit, filters_from, sigma, colour_norm, baseline, baseline_power, patch_norm, epochs, batch,
          lr, weight_decay, val_fraction, augment, augment_fraction, learn_epochs, learn_batch, backend, device, seed, skip_bad, no_cache, threads, as_json):
    """Train a classifier: the head on frozen learned filters, or (--baseline) the CONV twin end to end."""
    from edgehebb import threads as thread_policy
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.io import CONFIG_FILE, check_writable_dir
    from edgehebb.model import update_record
    from edgehebb.nnl import load_spec, with_options
    from edgehebb.train import BASELINE_FIT, FitConfig, find_bank, train_to_dir

    net_spec = with_options(load_spec(spec), sigma=sigma, colour_norm=colour_norm)
    if (out / CONFIG_FILE).exists():
        raise EdgehebbError(f"{out} already holds a model; choose another --out")
    check_writable_dir(out)   # before the data is decoded and the banks learned, not after
    if (baseline_power != 1.0 or patch_norm) and not baseline:
        raise EdgehebbError("--baseline-power and --patch-norm only apply with --baseline")
    learning = {"--filters-from": bool(filters_from), "--learn-epochs": learn_epochs != 1,
                "--learn-batch": learn_batch != 1000, "--backend": backend != "auto", "--no-cache": no_cache}
    if baseline and any(learning.values()):
        raise EdgehebbError(f"{', '.join(k for k, v in learning.items() if v)} do not apply with --baseline "
                            f"(it learns no filter bank and caches no features)")
    for i, block in enumerate(net_spec.blocks if filters_from else []):   # reads (and checks) the banks before the data
        if find_bank(list(filters_from), block, net_spec.input[0]) is None:
            raise EdgehebbError(f"no filter bank in {', '.join(map(str, filters_from))} fits block {i} of "
                                f"{net_spec.name} (K={block.filters}, W={block.kernel}, C={net_spec.input[0]}, "
                                f"preprocess {block.preprocess})")
    base = BASELINE_FIT if baseline else FitConfig()
    fit = FitConfig(epochs=epochs or base.epochs, batch=batch, lr=lr or base.lr, weight_decay=weight_decay,
                    val_fraction=val_fraction, seed=seed, augment=augment, augment_fraction=augment_fraction)
    fit.check()   # an unknown --augment name fails before the data is decoded
    train_set = load_split(resolve_data_root(data), "train", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(train_set)} training images from {train_set.source}", err=True)
    with thread_policy.configured(threads):
        record = train_to_dir(net_spec, train_set, out, fit=fit, filters_from=list(filters_from), baseline=baseline,
                              conv_power=baseline_power, patch_norm=patch_norm,
                              learn={"epochs": learn_epochs, "batch": learn_batch, "seed": seed},
                              backend=backend, device=device, cache="" if no_cache else None)
    extra = {"threads": {"requested": "auto" if threads is None else threads, "cores": thread_policy.cores()},
             **_skipped_record(train_set)}
    update_record(out, extra)
    record = {**record, **extra}
    if as_json:
        click.echo(json.dumps(record, indent=2))


@cli.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@data_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N test images.")
@click.option("--intensity", type=click.FloatRange(0, 1), default=0.3, help="Shadow intensity (pixel multiplier).")
@click.option("--coverage", type=click.FloatRange(0, 1), default=0.8, help="Shadowed fraction of each image.")
@click.option("--shadow-seed", type=SEEDS, default=0, help="Seed of the shadow shapes.")
@click.option("--sweep/--no-sweep", default=True, help="Also measure error at shadow intensities 0.1 ... 1.0.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Error-vs-intensity plot of all MODELS [default: MODEL/eval.png for one model directory, else ./eval.png]; "
                   "with --conditions, accuracy against severity [default: conditions.png in the same place].")
@click.option("--conditions", default=None, metavar="all|NAME,...",
              help="Instead of the shadow evaluation, measure accuracy against severity under camera conditions: "
                   f"all, or names separated by commas from: {', '.join(CONDITION_NAMES)} (edgehebb/conditions.py "
                   "describes each).")
@click.option("--severities", "severity_specs", multiple=True, metavar="NAME=S1,S2,...",
              help="With --conditions: these severities of NAME instead of its default sweep (0, clean, always "
                   "included); repeatable.")
@click.option("--seed", type=SEEDS, default=0,
              help="With --conditions: seed of the per-image sensor noise, lighting directions and shadow shapes.")
@click.option("--per-class", is_flag=True, help="With --conditions: per-class accuracy at every severity in the JSON.")
@click.option("--device", type=DEVICES, default="auto", help="Device to run the models on.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.pass_context
def eval_(ctx, models, data, limit, intensity, coverage, shadow_seed, sweep, png, conditions, severity_specs, seed,
          per_class, device, skip_bad, as_json):
    """Test accuracy of one or more trained MODELS on clean and shadowed images, per class, or
    (--conditions) against the severity of camera conditions.

    MODELS are model directories or names of shipped models (e.g. fig2_left-cifar10).
    """
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.evaluate import evaluate, per_class_table, save_sweep_png
    from edgehebb.io import check_writable
    from edgehebb.learn_dir import resolve_device
    from edgehebb.model import load_model
    from edgehebb.shadow import SWEEP_INTENSITIES

    def given(options: dict[str, str]) -> list[str]:
        return [flag for param, flag in options.items()
                if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT]

    if conditions is not None:
        return _eval_conditions(models, data, limit, png, conditions, severity_specs, seed, per_class, device, skip_bad,
                                as_json, given({"intensity": "--intensity", "coverage": "--coverage",
                                                "shadow_seed": "--shadow-seed", "sweep": "--sweep/--no-sweep"}))
    stray = given({"severity_specs": "--severities", "seed": "--seed", "per_class": "--per-class"})
    if stray:
        raise EdgehebbError(f"{', '.join(stray)} apply only with --conditions")
    if png is not None and not sweep:
        raise EdgehebbError("--png draws the intensity sweep, which --no-sweep turns off")
    device = resolve_device(device)
    one = Path(models[0])
    # beside a model the user trained; a shipped model's folder may be read-only
    where = png or (one / "eval.png" if len(models) == 1 and one.is_dir() else Path("eval.png"))
    if sweep:
        check_writable(where)  # before the evaluation, not after it
    loaded = {name: load_model(name, device) for name in models}   # a bad model fails before the data is decoded
    test = load_split(resolve_data_root(data), "test", limit=limit, skip_bad=skip_bad)
    results = {}
    for name, (net, config) in loaded.items():
        r = evaluate(net, test, config["classes"], intensity=intensity, coverage=coverage, seed=shadow_seed,
                     sweep=SWEEP_INTENSITIES if sweep else None, device=device)
        results[name] = r
        # the figures go to stdout unless --json owns it
        click.echo(f"{name}: clean accuracy {r['clean']['accuracy']:.2%}, shadowed ({coverage:.0%} x {intensity}) "
                   f"{r['shadowed']['accuracy']:.2%} on {len(test)} images", err=as_json)
        click.echo(per_class_table(r), err=as_json)
    if sweep:
        save_sweep_png(results, where)
        click.echo(f"wrote {where}", err=True)
    if as_json:
        click.echo(json.dumps(results[models[0]] if len(models) == 1 else results, indent=2))


def _eval_conditions(models, data, limit, png, names, severity_specs, seed, per_class, device, skip_bad, as_json,
                     shadow_options):
    """eval --conditions: names, severities, models and the PNG path checked before the data is decoded."""
    from edgehebb import conditions
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.evaluate import conditions_table, evaluate_conditions, save_conditions_png
    from edgehebb.io import check_writable
    from edgehebb.learn_dir import resolve_device
    from edgehebb.model import load_model

    if shadow_options:
        raise EdgehebbError(f"{', '.join(shadow_options)} do not apply with --conditions (its shadow condition "
                            f"has severity 1 - intensity at the paper's coverage; pick severities with "
                            f"--severities shadow=...)")
    sweeps = dict(conditions.parse_sweep(spec) for spec in severity_specs)
    conditions.plan(names, sweeps)   # names and severities checked before the models and data are read
    device = resolve_device(device)
    one = Path(models[0])
    where = png or (one / "conditions.png" if len(models) == 1 and one.is_dir() else Path("conditions.png"))
    check_writable(where)
    loaded = {name: load_model(name, device) for name in models}
    test = load_split(resolve_data_root(data), "test", limit=limit, skip_bad=skip_bad)
    result = evaluate_conditions({name: (net, config["classes"]) for name, (net, config) in loaded.items()}, test,
                                 names, sweeps=sweeps, seed=seed, per_class=per_class, device=device)
    for name in models:
        click.echo(f"{name}: accuracy under camera conditions on {len(test)} images (seed {seed})", err=as_json)
        click.echo(conditions_table(result, name), err=as_json)
    save_conditions_png(result, where)
    click.echo(f"wrote {where}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))


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


# Commands that live in their own modules (click and the standard library only at import time).
from edgehebb.cli_bench import bench  # noqa: E402
from edgehebb.cli_export import export  # noqa: E402

cli.add_command(export)
cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per user error, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="edgehebb", standalone_mode=False)
    except click.exceptions.Abort as e:
        # a learning run stopped by SIGINT/SIGTERM has said where its checkpoint is; exit as the signal would
        signum = getattr(e.__cause__, "signum", None)
        if signum is None:   # Ctrl-C anywhere else
            click.echo("Aborted.", err=True)
            signum = 2
        sys.exit(128 + signum)
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
