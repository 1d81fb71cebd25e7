"""Options and checks shared by the ``edgehebb`` commands (click and the standard library only)."""

from __future__ import annotations

from pathlib import Path

import click

DEVICES = click.Choice(["auto", "cpu", "cuda"])
CONDITION_NAMES = ("low-light", "wb-warm", "wb-cool", "tint-green", "tint-magenta", "overexposure", "underexposure",
                   "gamma-high", "gamma-low", "gradient", "vignette", "jpeg", "shadow")   # = edgehebb.camera.conditions.CONDITIONS
SEEDS = click.IntRange(0, 2 ** 32 - 1)  # what numpy and torch generators take


def data_option(f):
    return click.option("--data", "data", type=click.Path(path_type=Path), default=None,
                        help="Image-folder tree, cifar-10-batches-py folder or .npz "
                             "[default: $EDGEHEBB_DATA, else ~/.cache/edgehebb/cifar10]")(f)


def threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for learning and features [default: measured as it runs, so that "
                             "cores shared with other jobs do not stall it]")(f)


def skipped_record(data) -> dict:
    """config.json's list of the image files --skip-bad left out (the log line names only a few)."""
    return {"skipped_images": list(data.skipped)} if data.skipped else {}



def given(ctx: click.Context, options: dict[str, str]) -> list[str]:
    """The flags among ``options`` (parameter name -> flag as the user types it) that the user set.

    The one way the commands ask "was this option given?": by where click took the value from, so a
    default that happens to equal the value typed counts as given, and no default is restated here.
    """
    return [flag for param, flag in options.items()
            if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT]


def picture_path(png: Path | None, models: tuple[str, ...], name: str) -> Path | None:
    """Where a command draws its picture: ``--png``, else beside the one model directory given by its path
    (one the user trained), else nowhere: nothing is written into the current folder unasked."""
    if png is not None:
        return png
    one = Path(models[0])   # a shipped model's bare name is no directory here: its folder may be read-only
    return one / name if len(models) == 1 and one.is_dir() else None
