"""The torch backend: a model directory run by the torch reference itself, on the CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from edgehebb.deploy.backends.base import Backend, Staging
from edgehebb.deploy.frames import frames_to_tensor


class TorchBackend(Backend):
    name = "torch"
    targets = ("model",)
    devices = ("cpu", "cuda")

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"no CUDA GPU visible to torch {torch.__version__}"
        return None

    def __init__(self, model_dir: Path, device: str, channel_order: str, fit: str):
        from edgehebb.nnl.model import load_model

        self.device = torch.device(device)
        self.net, config = load_model(model_dir, self.device)
        self.classes = [str(c) for c in config["classes"]]
        _, h, w = config["spec"]["input"]
        self.input_size = (int(h), int(w))
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

    def close(self) -> None:
        super().close()
        self.net = None
