"""Trained model directories: what ``edgehebb train`` writes and eval, export and the runtime load.

A model directory holds

- ``config.json``: ``format`` (``edgehebb.model/1``; ``/2`` for a head with a hidden layer), ``kind``
  (``nnl``: frozen learned filters; ``conv``: the CONV twin or a backprop ablation trained end to end,
  with its ``conv`` settings),
  the network ``spec`` (as in ``models/*.json``, with any per-run changes already applied), the
  ``classes`` (names, index = label), the input convention and a record of how it was trained;
- ``model.safetensors``: the network's ``state_dict`` (filters, head, feature standardisation).

Shipped models live in ``models/<name>/`` and load by bare name, like specs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from edgehebb.errors import EdgehebbError
from edgehebb.io import (CONFIG_FILE, FORMAT, atomic_write_json, load_filters, load_tensors, load_whitening, read_json,
                         save_tensors)
from edgehebb.learn.patches import in_pixels
from edgehebb.nnl.spec import NetSpec, spec_from_dict
from edgehebb.nnl.layers import ConvNet, NNLNet, Net
from edgehebb.resources import data_dirs

MODEL_FORMAT = "edgehebb.model/1"
# Version 2 added the head's hidden layer (spec ``head_hidden``). A model is written with the lowest version
# that holds it, so a reader of version 1 still runs every model with a linear head.
MODEL_FORMATS = (MODEL_FORMAT, "edgehebb.model/2")
WEIGHTS_FILE = "model.safetensors"
# Images enter every network as float32 NCHW RGB in [0, 1] (uint8 / 255).
INPUT = {"layout": "NCHW", "dtype": "float32", "channels": "RGB", "range": [0.0, 1.0]}


def model_format(spec: NetSpec) -> str:
    """The format version a model of ``spec`` is written with (the lowest that holds it)."""
    return MODEL_FORMATS[1] if spec.head_hidden else MODEL_FORMATS[0]


def build_net(kind: str, spec: NetSpec, conv: dict | None = None, where: str = "model") -> Net:
    """An untrained network of ``kind`` for ``spec`` (filters zero for ``nnl``, random for ``conv``).

    ``conv`` holds a CONV twin's settings as config.json stores them; ``where`` names that file in errors.
    """
    if kind == "nnl":
        c = spec.input[0]
        n = [c * b.kernel ** 2 for b in spec.blocks]
        return NNLNet(spec, [(torch.zeros(b.filters, k, 1, 1), torch.zeros(k, c, b.kernel, b.kernel)) if b.whiten
                             else torch.zeros(b.filters, c, b.kernel, b.kernel) for b, k in zip(spec.blocks, n)])
    if kind == "conv":
        conv = {} if conv is None else conv
        power = conv.get("power", 1.0) if isinstance(conv, dict) else None
        patch_norm = conv.get("patch_norm", False) if isinstance(conv, dict) else None
        number = isinstance(power, (int, float)) and not isinstance(power, bool)
        if not (number and power > 0 and isinstance(patch_norm, bool)):
            raise EdgehebbError(f"{where}: 'conv' must be an object with a positive number 'power' and a true/false "
                                f"'patch_norm', got {conv!r}")
        return ConvNet(spec, power=float(power), patch_norm=patch_norm)
    raise EdgehebbError(f"unknown model kind {kind!r} (expected 'nnl' or 'conv')")


def model_kind(net: Net) -> tuple[str, dict | None]:
    if isinstance(net, NNLNet):
        return "nnl", None
    if isinstance(net, ConvNet):
        return "conv", {"power": net.power, "patch_norm": net.patch_norm}
    raise EdgehebbError(f"cannot save a {type(net).__name__}; expected NNLNet or ConvNet")


def save_model(out: str | os.PathLike, net: Net, classes: list[str], record: dict | None = None) -> Path:
    """Write ``net`` into the model directory ``out`` (weights first, then config.json, both atomic)."""
    out = Path(out)
    if len(classes) != net.spec.classes:
        raise EdgehebbError(f"{len(classes)} class names for a {net.spec.classes}-class network")
    kind, conv = model_kind(net)
    state = net.state_dict()
    if kind == "nnl":   # a net with trainable filters holds them raw; an nnl model file holds unit filters
        state.update({f"blocks.{i}.weight": block.unit_weight().detach() for i, block in enumerate(net.blocks)})
    save_tensors(out / WEIGHTS_FILE, {k: v.float() for k, v in state.items()})
    config = {"format": model_format(net.spec), "kind": kind, "spec": net.spec.to_dict(), "classes": list(classes),
              "input": INPUT}
    if conv is not None:
        config["conv"] = conv
    atomic_write_json(out / CONFIG_FILE, {**config, **(record or {})})
    return out


def update_record(model_dir: str | os.PathLike, extra: dict) -> None:
    """Add ``extra`` to the config.json of a model directory (what the CLI knows and training does not)."""
    path = Path(model_dir) / CONFIG_FILE
    atomic_write_json(path, {**read_json(path), **extra})


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model directory by path, or by bare name of a shipped model (``models/<name>/``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:
        for d in data_dirs("models"):
            found = d.joinpath(text)
            if found.is_dir() and found.joinpath(CONFIG_FILE).is_file():
                return Path(str(found))
    raise EdgehebbError(f"model {text!r} is neither a directory nor a shipped model "
                        f"(shipped: {', '.join(shipped_models()) or 'none'})")


def shipped_models() -> list[str]:
    return sorted({p.name for d in data_dirs("models") for p in d.iterdir()
                   if p.is_dir() and p.joinpath(CONFIG_FILE).is_file()})


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Net, dict]:
    """(network in eval mode, config dict) of a model directory written by :func:`save_model`."""
    path = resolve_model(name_or_path)
    config = read_json(path / CONFIG_FILE)
    if config.get("format") not in MODEL_FORMATS:
        hint = " (a filter bank: train a model from it with `edgehebb train --filters-from`)" \
            if str(config.get("format", "")).startswith("edgehebb.filters") else ""
        raise EdgehebbError(f"{path / CONFIG_FILE} is not an edgehebb model (format {config.get('format')!r}, "
                            f"expected {' or '.join(map(repr, MODEL_FORMATS))}){hint}")
    spec = spec_from_dict(config.get("spec"), f"{path / CONFIG_FILE}: spec")
    if config["format"] != model_format(spec):
        raise EdgehebbError(f"{path / CONFIG_FILE}: format {config['format']!r} does not match its spec "
                            f"(head_hidden {spec.head_hidden}: {model_format(spec)!r})")
    classes = config.get("classes")
    if not isinstance(classes, list) or len(classes) != spec.classes:
        raise EdgehebbError(f"{path / CONFIG_FILE}: 'classes' must list {spec.classes} names")
    net = build_net(config.get("kind"), spec, config.get("conv"), str(path / CONFIG_FILE))
    tensors, _ = load_tensors(path / WEIGHTS_FILE)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise EdgehebbError(f"{path / WEIGHTS_FILE} does not fit the network in {path / CONFIG_FILE}: {first}") from None
    return net.to(device).eval(), config


def model_filters(name_or_path: str | os.PathLike) -> tuple[list[tuple[str, torch.Tensor]], Path]:
    """The banks ``edgehebb show`` draws, as (label, (K, C, W, W)), and the directory they came from.

    A filter bank (``edgehebb learn``) has one; a trained model (``edgehebb train``, or a shipped
    model's name) has one per block, each as the network uses it (unit filters for NNL blocks).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file() and read_json(path / CONFIG_FILE).get("format") == FORMAT:
        # a whitened bank's rows live in the whitened space: drawn as what each responds to in pixels
        return [("", in_pixels(load_filters(path)[0], load_whitening(path)))], path
    where = resolve_model(name_or_path)
    net, _ = load_model(where)
    banks = [in_pixels(block.unit_weight(), block.whitening) if hasattr(block, "unit_weight") else block.conv.weight
             for block in net.blocks]
    labels = [""] if len(banks) == 1 else [f"block {i}: " for i in range(len(banks))]
    return [(label, bank.detach()) for label, bank in zip(labels, banks)], where
