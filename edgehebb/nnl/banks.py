"""Filter banks for a network's blocks: found in bank or model directories, or learned with ``edgehebb learn``'s
machinery (resumable, under ``OUT/banks/``) when none fits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.io import CHECKPOINT_FILE, CONFIG_FILE, FILTERS_FILE, load_filters, load_tensors, load_whitening, read_json
from edgehebb.learn.directory import learn_to_dir, normalised_data_key, settings_differ
from edgehebb.learn.loop import LearnConfig
from edgehebb.nnl.model import MODEL_FORMATS, WEIGHTS_FILE
from edgehebb.nnl.spec import BlockSpec, NetSpec, spec_from_dict

Log = Callable[[str], None]


class FoundBank(NamedTuple):
    filters: torch.Tensor     # (K, C, W, W); a whitened bank's (K, N, 1, 1)
    path: Path                # the filter-bank or model directory it came from
    learn: dict | None        # how it was learned (edgehebb learn's settings), as that directory records it
    whitening: torch.Tensor | None = None   # a whitened bank's convolution (N, C, W, W)

    def bank(self):
        """What NNLNet takes for the block: the filters, or (filters, whitening) for a whitened bank."""
        return self.filters.float() if self.whitening is None else (self.filters.float(), self.whitening.float())


def _shape(block: BlockSpec, channels: int) -> tuple[int, ...]:
    n = channels * block.kernel ** 2
    return (block.filters, n, 1, 1) if block.whiten else (block.filters, channels, block.kernel, block.kernel)


def _learned(config: dict, index: int | None) -> dict | None:
    """The learn settings a bank or model directory's config.json records for its bank (model: block ``index``)."""
    if index is None:
        return config.get("learn")
    learn = config.get("filters", {}).get("learn") if isinstance(config.get("filters"), dict) else None
    if isinstance(learn, list) and index < len(learn):
        learn = learn[index]
        # models trained from another model's bank recorded that model's list: one bank, one list deeper
        return learn[0] if isinstance(learn, list) and len(learn) == 1 else learn
    return None


def _bank_from_dir(path: Path, block: BlockSpec, channels: int) -> FoundBank | None:
    """A (K, C, W, W) bank in ``path`` (a filter-bank or an NNL model directory) that fits ``block``."""
    shape = _shape(block, channels)
    if not (path / CONFIG_FILE).is_file():
        return None
    config = read_json(path / CONFIG_FILE)
    fmt = config.get("format")
    if fmt in MODEL_FORMATS:
        if config.get("kind") != "nnl":
            return None
        if not isinstance(config.get("spec"), dict):
            raise EdgehebbError(f"{path / CONFIG_FILE} is an NNL model without a 'spec': not a model edgehebb wrote")
        spec = spec_from_dict(config["spec"], str(path / CONFIG_FILE))
        tensors, _ = load_tensors(path / WEIGHTS_FILE)
        for i, b in enumerate(spec.blocks):
            w, z = tensors.get(f"blocks.{i}.weight"), tensors.get(f"blocks.{i}.whitening")
            if w is not None and tuple(w.shape) == shape and b.center == block.center and (z is None) != bool(block.whiten):
                return FoundBank(w, path, _learned(config, i), z)
        return None
    if fmt is not None and str(fmt).startswith("edgehebb.filters") and (path / FILTERS_FILE).is_file():
        filters, config = load_filters(path)
        z = load_whitening(path)
        if (tuple(filters.shape) == shape and config.get("learn", {}).get("preprocess") == block.preprocess
                and (z is None) != bool(block.whiten)):
            return FoundBank(filters, path, _learned(config, None), z)
    return None


def find_bank(sources: list[Path], block: BlockSpec, channels: int) -> FoundBank | None:
    """The first bank fitting ``block`` in ``sources`` or their immediate subdirectories."""
    for src in sources:
        for path in [src, *sorted(p for p in src.iterdir() if p.is_dir())] if src.is_dir() else []:
            found = _bank_from_dir(path, block, channels)
            if found is not None:
                return found
    return None


def require_bank(sources: list[Path], spec: NetSpec, index: int) -> FoundBank:
    """:func:`find_bank` for block ``index`` of ``spec``; none fitting is an error naming the block."""
    block, channels = spec.blocks[index], spec.input[0]
    found = find_bank(sources, block, channels)
    if found is None:
        raise EdgehebbError(f"no filter bank in {', '.join(map(str, sources))} fits block {index} of {spec.name} "
                            f"(K={block.filters}, W={block.kernel}, C={channels}, preprocess {block.preprocess}"
                            f"{', whitened' if block.whiten else ''})")
    return found


def bank_dir(out: Path, index: int, block: BlockSpec) -> Path:
    return out / "banks" / f"block{index}-W{block.kernel}-K{block.filters}-{block.preprocess}"


def filter_banks(spec: NetSpec, train: ImageSet, out: Path, *, filters_from: list[Path], learn: dict,
                 backend: str, device: str, progress: bool, log: Log) -> tuple[list[torch.Tensor], list[str], list]:
    """One bank per block, (banks, where each came from, how each was learned): found in ``filters_from`` (or
    ``out/banks`` from an earlier run), else learned."""
    banks, origins, settings = [], [], []
    for i, block in enumerate(spec.blocks):
        if filters_from:
            found = require_bank(filters_from, spec, i)
            banks.append(found.bank())
            origins.append(str(found.path))
            settings.append(found.learn)
            log(f"block {i}: filters from {found.path}")
            continue
        where = bank_dir(out, i, block)
        config = LearnConfig(filters=block.filters, kernel=block.kernel, preprocess=block.preprocess,
                             whiten=block.whiten, **learn)
        data_key = {"source": train.source, "split": "train", "images": len(train)}
        if (where / FILTERS_FILE).is_file():  # finished by an earlier, interrupted `train` into this OUT
            _check_bank(where, config, data_key)
            log(f"block {i}: filters from {where} (learned by an earlier run)")
        else:
            log(f"block {i}: learning K={block.filters} W={block.kernel} filters into {where}")
            learn_to_dir(train.x, config, where, data_key=data_key, backend=backend, device=device,
                         resume=(where / CHECKPOINT_FILE).is_file(), progress=progress, log=log)
        filters, saved = load_filters(where)
        z = load_whitening(where)
        banks.append(filters if z is None else (filters, z))
        origins.append(str(where))
        settings.append(saved.get("learn"))
    return banks, origins, settings


def _check_bank(where: Path, config: LearnConfig, data_key: dict) -> None:
    """A bank left in OUT/banks is reused only if it was learned with these settings from this data."""
    saved = read_json(where / CONFIG_FILE)
    differ = settings_differ(saved.get("learn"), config)
    if differ or normalised_data_key(saved.get("data")) != data_key:
        what = differ or f"data {saved.get('data')}"
        raise EdgehebbError(f"{where} was learned with other settings or data ({what}) than this run asks for; "
                            f"delete it to learn it again, or choose another --out")
