"""``edgehebb eval``: test accuracy, clean and shadowed, or against the severity of camera conditions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgehebb.cli.options import CONDITION_NAMES, DEVICES, SEEDS, data_option, given, picture_path
from edgehebb.errors import EdgehebbError

@click.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@data_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a class-balanced subset of N test images.")
@click.option("--intensity", type=click.FloatRange(0, 1), default=0.3, help="Shadow intensity (pixel multiplier).")
@click.option("--coverage", type=click.FloatRange(0, 1), default=0.8, help="Shadowed fraction of each image.")
@click.option("--shadow-seed", type=SEEDS, default=0, help="Seed of the shadow shapes.")
@click.option("--sweep/--no-sweep", default=True, help="Also measure error at shadow intensities 0.1 ... 1.0.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Error-vs-intensity plot of all MODELS [default: MODEL/eval.png for one model directory given by "
                   "its path, else no picture]; with --conditions, accuracy against severity [default: "
                   "MODEL/conditions.png likewise].")
@click.option("--conditions", default=None, metavar="all|NAME,...",
              help="Instead of the shadow evaluation, measure accuracy against severity under camera conditions: "
                   f"all, or names separated by commas from: {', '.join(CONDITION_NAMES)} (edgehebb/camera/conditions.py "
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
    from edgehebb.evaluate.accuracy import evaluate, per_class_table, save_sweep_png
    from edgehebb.io import check_writable
    from edgehebb.devices import resolve_device
    from edgehebb.nnl.model import load_model
    from edgehebb.camera.shadow import SWEEP_INTENSITIES

    if conditions is not None:
        return _eval_conditions(models, data, limit, png, conditions, severity_specs, seed, per_class, device, skip_bad,
                                as_json, given(ctx, {"intensity": "--intensity", "coverage": "--coverage",
                                                "shadow_seed": "--shadow-seed", "sweep": "--sweep/--no-sweep"}))
    stray = given(ctx, {"severity_specs": "--severities", "seed": "--seed", "per_class": "--per-class"})
    if stray:
        raise EdgehebbError(f"{', '.join(stray)} apply only with --conditions")
    if png is not None and not sweep:
        raise EdgehebbError("--png draws the intensity sweep, which --no-sweep turns off")
    device = resolve_device(device)
    where = picture_path(png, models, "eval.png") if sweep else None
    if where is not None:
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
    if where is not None:
        save_sweep_png(results, where)
        click.echo(f"wrote {where}", err=True)
    if as_json:
        click.echo(json.dumps(results[models[0]] if len(models) == 1 else results, indent=2))


def _eval_conditions(models, data, limit, png, names, severity_specs, seed, per_class, device, skip_bad, as_json,
                     shadow_options):
    """eval --conditions: names, severities, models and the PNG path checked before the data is decoded."""
    from edgehebb.camera import conditions
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.evaluate.accuracy import conditions_table, evaluate_conditions, save_conditions_png
    from edgehebb.io import check_writable
    from edgehebb.devices import resolve_device
    from edgehebb.nnl.model import load_model

    if shadow_options:
        raise EdgehebbError(f"{', '.join(shadow_options)} do not apply with --conditions (its shadow condition "
                            f"has severity 1 - intensity at the paper's coverage; pick severities with "
                            f"--severities shadow=...)")
    sweeps = dict(conditions.parse_sweep(spec) for spec in severity_specs)
    conditions.plan(names, sweeps)   # names and severities checked before the models and data are read
    device = resolve_device(device)
    where = picture_path(png, models, "conditions.png")
    if where is not None:
        check_writable(where)
    loaded = {name: load_model(name, device) for name in models}
    test = load_split(resolve_data_root(data), "test", limit=limit, skip_bad=skip_bad)
    result = evaluate_conditions({name: (net, config["classes"]) for name, (net, config) in loaded.items()}, test,
                                 names, sweeps=sweeps, seed=seed, per_class=per_class, device=device)
    for name in models:
        click.echo(f"{name}: accuracy under camera conditions on {len(test)} images (seed {seed})", err=as_json)
        click.echo(conditions_table(result, name), err=as_json)
    if where is not None:
        save_conditions_png(result, where)
        click.echo(f"wrote {where}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))


