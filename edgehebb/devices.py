"""Which torch device a command runs on: ``--device auto|cpu|cuda`` made concrete, or one line saying why not."""

from __future__ import annotations

import torch

from edgehebb.errors import EdgehebbError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; an explicit CUDA device without one raises."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgehebbError(f"--device {device} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return device
