"""The torch backend: a model directory run by the torch reference itself, on the CPU or CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from edgehebb.allocator import keep_freed_memory
from edgehebb.deploy.backends.base import Backend, Staging
from edgehebb.deploy.frames import frames_to_tensor


class TorchBackend(Backend):
    name = "torch"
    targets = ("model",)
    devices = ("cpu", "cuda")
    cpu_chunk = 4

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"no CUDA GPU visible to torch {torch.__version__}"
        return None

    def __init__(self, model_dir: Path, device: str, channel_order: str, fit: str, *, threads: int | None = None):
        from edgehebb.nnl.model import load_model
        from edgehebb.nnl.spec import map_floats

        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()   # the cosine maps' pages are not faulted back in on every call
        self.net, config = load_model(model_dir, self.device)
        self.classes = [str(c) for c in config["classes"]]
        _, h, w = config["spec"]["input"]
        self.input_size = (int(h), int(w))
        self.map_floats = map_floats(self.net.spec)
        self.channel_order, self.fit = channel_order, fit
        self._staging = Staging(self.device)

    @torch.inference_mode()
    def prepare(self, frames) -> torch.Tensor:
        return frames_to_tensor(self._staging.put(frames), self.input_size, self.channel_order, self.fit)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.net.features(x)
        logits = self.net.classify(feats)
        return {"logits": logits, "probabilities": logits.softmax(1), "features": feats}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def threads_scope(self, threads: int):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def close(self) -> None:
        super().close()
        self.net = None
