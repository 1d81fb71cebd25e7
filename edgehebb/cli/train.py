"""``edgehebb train``: a head on frozen learned filters, or the CONV twin end to end."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgehebb.cli.options import DEVICES, SEEDS, data_option, given, skipped_record, threads_option

@click.command()
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
                   "spec's, none in the shipped specs]; gray-world multiplies each channel by the image's mean grey over the channel's mean.")
@click.option("--head-hidden", type=click.IntRange(min=0), default=None,
              help="A hidden layer of N ReLU units in the head (Linear -> ReLU -> Linear), replacing the spec's "
                   "[default: the spec's; 0, a linear softmax head, in the shipped specs]. --dropout applies to it too.")
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
@click.option("--flip", is_flag=True, help="Also train on every training image mirrored left-right (the head: their "
              "features too; a --baseline twin: half of each batch mirrored).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Dropout on the features, and on the head's hidden layer if it has one, while training "
                   "(none at inference).")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              help="Learning rate: constant, or annealed to 0 along a cosine over the epochs.")
@click.option("--learn-epochs", type=click.IntRange(min=1), default=1, help="Epochs of `edgehebb learn` for missing banks.")
@click.option("--learn-batch", type=click.IntRange(min=1), default=1000, help="Minibatch of `edgehebb learn` for missing banks.")
@click.option("--backend", type=click.Choice(["auto", "torch", "pycuda"]), default="auto", help="Backend for learning banks.")
@click.option("--device", type=DEVICES, default="auto", help="Device for features and training.")
@click.option("--seed", type=SEEDS, default=0, help="Seeds the validation split, initialisation, shuffles and learning.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the frozen-feature cache.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the training record as JSON on stdout.")
@click.pass_context
def train(ctx, spec, data, out, limit, filters_from, sigma, colour_norm, head_hidden, baseline, baseline_power, patch_norm,
          epochs, batch, lr, weight_decay, val_fraction, augment, augment_fraction, flip, dropout, schedule, learn_epochs, learn_batch, backend, device,
          seed, skip_bad, no_cache, threads, as_json):
    """Train a classifier: the head on frozen learned filters, or (--baseline) the CONV twin end to end."""
    from edgehebb import threads as thread_policy
    from edgehebb.data import load_split, resolve_data_root
    from edgehebb.nnl.spec import load_spec, with_options
    from edgehebb.nnl.train import check_request, train_to_dir, training_config

    net_spec = with_options(load_spec(spec), sigma=sigma, colour_norm=colour_norm, head_hidden=head_hidden)
    check_request(net_spec, out, filters_from=list(filters_from), baseline=baseline,
                  baseline_only=given(ctx, {"baseline_power": "--baseline-power", "patch_norm": "--patch-norm"}),
                  learning_only=given(ctx, {"filters_from": "--filters-from", "learn_epochs": "--learn-epochs",
                                            "learn_batch": "--learn-batch", "backend": "--backend",
                                            "no_cache": "--no-cache"}))
    training = training_config(baseline, epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay,
                               val_fraction=val_fraction, seed=seed, augment=augment,
                               augment_fraction=augment_fraction, flip=flip, dropout=dropout,
                               schedule=schedule)
    train_set = load_split(resolve_data_root(data), "train", limit=limit, skip_bad=skip_bad)
    click.echo(f"{len(train_set)} training images from {train_set.source}", err=True)
    extra = {"threads": {"requested": "auto" if threads is None else threads, "cores": thread_policy.cores()},
             **skipped_record(train_set)}
    with thread_policy.configured(threads):
        record = train_to_dir(net_spec, train_set, out, training=training, filters_from=list(filters_from),
                              baseline=baseline, conv_power=baseline_power, patch_norm=patch_norm,
                              learn={"epochs": learn_epochs, "batch": learn_batch, "seed": seed},
                              backend=backend, device=device, cache="" if no_cache else None, extra=extra)
    if as_json:
        click.echo(json.dumps(record, indent=2))
