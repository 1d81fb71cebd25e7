"""Finding the files that ship beside the Python code: CUDA sources (cuda/) and model specs (models/).

Both folders live at the top of the source tree; the wheel maps them to ``edgehebb/cuda`` and
``edgehebb/models`` (pyproject's force-include). This is the one place that knows both locations.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from edgehebb.errors import EdgehebbError

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def data_dirs(folder: str) -> list:
    """Existing copies of ``folder`` ("cuda" or "models"): the installed package's first, then the source tree's."""
    dirs = []
    try:
        packaged = importlib.resources.files("edgehebb").joinpath(folder)
        if packaged.is_dir():
            dirs.append(packaged)
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass  # not importable as a package resource (e.g. a zipped install): the source tree may still have it
    if (_SOURCE_ROOT / folder).is_dir():
        dirs.append(_SOURCE_ROOT / folder)
    return dirs


def cuda_source(name: str) -> str:
    """The text of ``name`` (e.g. ``"hebbian_step.cu"``): package data first, then the source tree."""
    for d in data_dirs("cuda"):
        path = d.joinpath(name)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise EdgehebbError(f"CUDA source {name!r} is neither in the installed package (edgehebb/cuda) "
                        f"nor in the source tree ({_SOURCE_ROOT / 'cuda'}); reinstall edgehebb")
