"""Learning into a model directory: checkpoints, Ctrl-C, resume, and the finished bank.

``out/checkpoint.safetensors`` holds the weights and, in its header, the settings, the history and
the position in the epoch in progress (steps done; the epoch's order is ``epoch_order(seed,
epoch)``, so the position is enough) with that epoch's win counts. It is written after every epoch,
every ``CHECKPOINT_SECONDS`` within an epoch, and when SIGINT or SIGTERM arrives (the run then stops
with :class:`Interrupted`); ``--resume`` continues from it to bitwise the same filters as an
uninterrupted run. When the run ends, ``filters.safetensors``, ``config.json`` and ``filters.png``
are written (each atomically) and the checkpoint stays as the record of the last epoch.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

import edgehebb
from edgehebb.devices import resolve_device
from edgehebb.errors import EdgehebbError
from edgehebb.io import CHECKPOINT_FILE, FILTERS_FILE, check_writable_dir, load_tensors, save_filters, save_tensors
from edgehebb.learn.loop import EpochStats, LearnConfig, LearnState, learn, resolve_backend
from edgehebb.learn.patches import flat_cosines, in_pixels
from edgehebb.viz import colour_orientation_summary, save_filter_png

# Below this median cosine between the rows and the flat patch, a bank learned from plain unit patches
# has collapsed (measured: healthy banks 0.93; collapsed ones -0.38 and -0.999).
COLLAPSED_FLAT_COSINE = 0.5

# A crash or kill -9 loses at most this much work; a checkpoint of 400 filters is ~80 KB.
CHECKPOINT_SECONDS = 120.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after its checkpoint was written (a KeyboardInterrupt, so code
    that stops on Ctrl-C stops on it; ``signum`` says which signal, for the exit status)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def normalised_data_key(saved) -> dict | None:
    """A checkpoint's data key. Checkpoints written before 2026-11-23 name the decode cache in an image
    folder's source; it moves with $EDGEHEBB_CACHE and is not part of the data, so it is dropped."""
    if not isinstance(saved, dict):
        return None
    source = saved.get("source")
    if isinstance(source, str) and source.startswith("image folder ") and " (decode cache " in source:
        saved = {**saved, "source": source[:source.index(" (decode cache ")]}
    return saved


# Settings added to LearnConfig after runs were saved without them: those runs used these values.
ADDED_SETTINGS = {"init": "normal", "rank_by": "current", "whiten": 0.0}


def settings_differ(saved, config: LearnConfig, ignore: tuple[str, ...] = ()) -> str:
    """The saved learn settings that differ from ``config``, as "name=saved value, ..." ("" if none)."""
    saved = saved if isinstance(saved, dict) else {}
    saved = {**ADDED_SETTINGS, **saved}
    return ", ".join(f"{k}={saved.get(k)}" for k, v in dataclasses.asdict(config).items()
                     if k not in ignore and saved.get(k) != v)


def _load_checkpoint(out: Path, config: LearnConfig, data_key: dict) -> LearnState:
    tensors, meta = load_tensors(out / CHECKPOINT_FILE)
    needed = {"learn": dict, "data": dict, "epochs_done": int, "history": list}
    if (not isinstance(meta, dict) or "weights" not in tensors
            or not all(isinstance(meta.get(k), t) for k, t in needed.items())):
        raise EdgehebbError(f"{out / CHECKPOINT_FILE} is not an edgehebb checkpoint")
    saved = meta["learn"]
    differ = settings_differ(saved, config, ignore=("epochs",))
    if differ:
        raise EdgehebbError(f"{out} was started with other settings ({differ}); "
                            "resume with the same options or choose another --out")
    if saved.get("epochs") != config.epochs:
        raise EdgehebbError(f"{out} was started with --epochs {saved.get('epochs')}; the annealing schedule depends on it, "
                            "so resume with the same --epochs (--learn-epochs in `edgehebb train`)")
    if normalised_data_key(meta.get("data")) != data_key:
        raise EdgehebbError(f"{out} was learned from other data ({meta.get('data')}); resume with the same --data and --limit")
    position, seconds = meta.get("position", 0), meta.get("epoch_seconds", 0.0)   # absent before mid-epoch checkpoints
    wins = tensors.get("wins")
    if (not isinstance(position, int) or position < 0 or not isinstance(seconds, (int, float))
            or (position > 0 and (wins is None or tuple(wins.shape) != (config.filters,)))):
        raise EdgehebbError(f"{out / CHECKPOINT_FILE} is not an edgehebb checkpoint (bad mid-epoch position)")
    whitening = tensors.get("whitening")
    if bool(config.whiten) != (whitening is not None):
        raise EdgehebbError(f"{out / CHECKPOINT_FILE} has {'a' if whitening is not None else 'no'} whitening matrix but "
                            f"this run asks for --whiten {config.whiten:g}")
    return LearnState(tensors["weights"].float(), meta["epochs_done"], [EpochStats(**h) for h in meta["history"]],
                      position, wins.long() if position > 0 else None, float(seconds),
                      whitening=None if whitening is None else whitening.float())


def check_out(out: str | Path, resume: bool) -> Path:
    """Refuse, before any work, an --out that cannot be written or that holds a run (unless resuming)."""
    out = Path(out)
    check_writable_dir(out)
    if resume and not (out / CHECKPOINT_FILE).is_file():
        raise EdgehebbError(f"nothing to resume: {out / CHECKPOINT_FILE} does not exist")
    if not resume and ((out / CHECKPOINT_FILE).exists() or (out / FILTERS_FILE).exists()):
        raise EdgehebbError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return out


@contextmanager
def _stop_on_signals():
    """While learning, SIGINT and SIGTERM only set a flag, read between backend calls; the handlers go
    back to what they were at once, so a second Ctrl-C stops the process without waiting."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
        yield caught
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        caught.append(signum)
        for s, h in saved.items():
            signal.signal(s, h)

    for s in saved:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def format_rate(per_s: float) -> str:
    """12.2 k patches/s, 231 k patches/s, 1.53 M patches/s: three figures whatever the machine."""
    value, unit = (per_s / 1e6, "M") if per_s >= 1e6 else (per_s / 1e3, "k")
    return f"{value:.3g} {unit} patches/s"


def learn_to_dir(images, config: LearnConfig, out: str | Path, *, data_key: dict, backend: str = "torch",
                 device: str = "cpu", resume: bool = False, progress: bool = True, threads: int | None = None,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS, extra: dict | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Learn a filter bank from uint8 NHWC ``images`` into ``out``; return the run's summary dict.

    ``extra`` goes into config.json beside the summary (the CLI's list of skipped image files).
    """
    out = check_out(out, resume)
    backend = resolve_backend(backend, device, config)  # before resolving device: --device cpu rules out pycuda
    device = resolve_device(device)
    state = None
    if resume:
        state = _load_checkpoint(out, config, data_key)
        at = f", {state.position * config.batch / 1e6:.3g} M patches into epoch {state.epochs_done + 1}" \
            if state.position else ""
        log(f"resuming {out} after epoch {state.epochs_done}/{config.epochs}{at}")

    def save(s: LearnState) -> None:
        meta = {"learn": dataclasses.asdict(config), "data": data_key, "epochs_done": s.epochs_done,
                "history": [dataclasses.asdict(x) for x in s.history], "position": s.position,
                "epoch_seconds": s.seconds}
        tensors = {"weights": s.weights, **({"wins": s.wins} if s.position else {}),
                   **({"whitening": s.whitening} if s.whitening is not None else {})}
        save_tensors(out / CHECKPOINT_FILE, tensors, meta)

    def on_epoch(s: LearnState) -> None:
        save(s)
        last[0] = time.monotonic()
        h = s.history[-1]
        log(f"epoch {h.epoch}/{config.epochs}  eps {h.eps:.4g}  |norm-1| {h.norm_error:.4f}  "
            f"dead {h.dead_fraction:.1%}  {h.seconds:.1f}s  {format_rate(h.patches_per_s)}")

    def on_call(snapshot: Callable[[], LearnState]) -> None:
        if not caught and time.monotonic() - last[0] < checkpoint_seconds:
            return
        s = snapshot()
        save(s)
        last[0] = time.monotonic()
        if caught:
            name = signal.Signals(caught[0]).name
            message = (f"{name}: stopped in epoch {s.epochs_done + 1}/{config.epochs} after "
                       f"{s.position * config.batch / 1e6:.3g} M patches; checkpoint written to {out / CHECKPOINT_FILE}; "
                       f"to continue, run `edgehebb learn` again with --resume (`edgehebb train` resumes by itself)")
            log(message)
            raise Interrupted(caught[0], message)

    last = [time.monotonic()]
    c = images.shape[3]
    with _stop_on_signals() as caught:
        state = learn(images, config, backend=backend, device=device, state=state, on_epoch=on_epoch,
                      on_call=on_call, threads=threads, progress=progress)
    # a whitened bank's rows live in the whitened patches' space: its filters are 1 x 1 over the N whitened
    # values (the blocks apply the whitening as a convolution first); the pictures and statistics show what
    # each unit responds to in pixels, Z m
    z = None if state.whitening is None else state.whitening.reshape(-1, c, config.kernel, config.kernel)
    filters = state.weights.reshape(config.filters, c, config.kernel, config.kernel) if z is None else \
        state.weights.reshape(config.filters, -1, 1, 1)
    shown = in_pixels(filters, z)
    stats = colour_orientation_summary(shown)
    flat = flat_cosines(shown.flatten(1))
    if config.preprocess == "unit" and z is None and float(flat.median()) < COLLAPSED_FLAT_COSINE:
        log(f"warning: the bank has collapsed: its rows' median cosine with the flat patch is {float(flat.median()):.2f} "
            f"(a healthy bank of plain patches sits near 0.9); the anti-Hebbian term pushed the units away from the "
            f"patches; learn again with a lower --delta (now {config.delta:g})")
    summary = {
        "edgehebb_version": edgehebb.__version__,
        "learn": dataclasses.asdict(config),
        "data": data_key,
        "image_shape": list(images.shape[1:]),
        "backend": backend,
        "device": device,
        "threads": state.threads,
        "history": [dataclasses.asdict(x) for x in state.history],
        "colour_orientation": stats,
        "flat_cosine_quantiles": [round(float(q), 4) for q in flat.quantile(torch.tensor([0.1, 0.5, 0.9],
                                                                                         dtype=torch.float64))],
        **(extra or {}),
    }
    save_filters(out, filters, summary, whitening=z)
    save_filter_png(shown, out / "filters.png", title=f"{config.filters} filters, W={config.kernel}, "
                    f"{stats['colour_units']} colour / {stats['bw_units']} black-and-white")
    return summary
