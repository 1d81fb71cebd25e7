"""Finding the CUDA C++ sources that ship with edgehebb.

The ``.cu`` files live in the top-level ``cuda/`` folder of the source tree; the wheel maps that
folder to ``edgehebb/cuda`` (pyproject's force-include). This is the one place that knows both.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from edgehebb.errors import EdgehebbError

_SOURCE_TREE = Path(__file__).resolve().parent.parent / "cuda"


def cuda_source(name: str) -> str:
    """The text of ``name`` (e.g. ``"hebbian_step.cu"``): package data first, then the source tree."""
    try:
        packaged = importlib.resources.files("edgehebb").joinpath("cuda", name)
        if packaged.is_file():
            return packaged.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    path = _SOURCE_TREE / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise EdgehebbError(f"CUDA source {name!r} is neither in the installed package (edgehebb/cuda) "
                        f"nor in the source tree ({_SOURCE_TREE}); reinstall edgehebb")
