"""`StandInEngine`: what `LearnerWorker.train_step` uses of a DeepSpeed engine, around a plain model (backward only:
no optimizer step, no collectives), for unit tests that run a real train step on one process."""

from __future__ import annotations

import torch


class StandInEngine:
    """A DeepSpeed engine stand-in: forward and backward of ``model``; ``step`` does nothing, the gradient norm and
    learning rate are the fixed ``grad_norm`` and ``1e-5``."""

    def __init__(self, model, grad_norm: float = 0.75) -> None:
        self.module, self.device, self.skipped_steps, self.grad_norm = model, torch.device("cpu"), 0, grad_norm

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_gradient_accumulation_boundary(self, _: bool) -> None: ...

    def step(self) -> None: ...

    def get_global_grad_norm(self) -> float:
        return self.grad_norm

    def get_lr(self) -> list[float]:
        return [1e-5]
