"""The pretraining optimiser and how one update is applied: AdamW, stepped after backward or inside it.

``build_optimizer`` makes the AdamW pretraining uses (its state dict is what checkpoints hold). ``updater`` yields
the function that turns a loss into an update; ``backward_and_step`` is the plain update fine-tuning uses. When
nothing needs all gradients at once (one process, no global-norm clipping, no fp16 loss scaling) each parameter is
stepped inside backward, as soon as its gradient is complete, and its gradient is freed straight away (PyTorch's
"optimizer step in backward" recipe): the model's full set of gradients never exists, which saves a weights-sized
block of memory (about 370 MiB for ViT-B) at the peak. The update is the same AdamW, element for element, as stepping
after backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


def build_optimizer(model: torch.nn.Module, train: Any) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all tensors, on CPU and CUDA) without weight decay on biases, norms and the mask
    token (1-D parameters); ``train`` gives ``lr``, ``betas`` and ``weight_decay``."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True)


def backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    model: torch.nn.Module,
    grad_clip: float,
) -> None:
    """Backward through the (fp16-)scaled loss, clip the global gradient norm (0: off), step and update the scaler."""
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


class StepInBackward:
    """Steps ``optimizer`` one parameter at a time from post-accumulate-grad hooks, then frees that gradient.

    Each parameter gets a one-parameter AdamW that shares ``optimizer``'s state (moments, step counts) and copies its
    group's hyper-parameters (the current lr) before every step, so ``optimizer.state_dict()`` and
    ``load_state_dict()`` keep working for checkpoints and resume.
    """

    def __init__(self, optimizer: torch.optim.AdamW) -> None:
        self.optimizer = optimizer
        self._single: dict[torch.nn.Parameter, tuple[torch.optim.AdamW, int]] = {}
        self._hooks = []
        for index, group in enumerate(optimizer.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self._single[p] = (torch.optim.AdamW([{"params": [p], **hyper}]), index)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._step))

    def remove(self) -> None:
        """Detach the hooks: later backward passes through the model leave the weights alone."""
        for hook in self._hooks:
            hook.remove()

    def _step(self, p: torch.nn.Parameter) -> None:
        single, index = self._single[p]
        group = self.optimizer.param_groups[index]  # looked up each time: load_state_dict makes new group dicts
        single.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        single.state = self.optimizer.state  # and a new state dict: follow it
        single.step()
        p.grad = None


@contextlib.contextmanager
def updater(
    model: torch.nn.Module,
    optimizer: torch.optim.AdamW,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    world: int = 1,
) -> Iterator[Callable[[torch.Tensor], None]]:
    """Yields ``update(loss)``: backward, AdamW step, gradients freed; the step runs inside backward unless
    ``world`` > 1 (DDP averages gradients after backward), ``grad_clip`` > 0 (needs the global norm of all gradients)
    or ``scaler`` is enabled (fp16 skips steps whose gradients overflow)."""
    if world == 1 and grad_clip <= 0 and not scaler.is_enabled():
        stepper = StepInBackward(optimizer)
        try:
            yield lambda loss: loss.backward()
        finally:
            stepper.remove()
        return

    def update(loss: torch.Tensor) -> None:
        backward_and_step(loss, optimizer, scaler, model, grad_clip)
        optimizer.zero_grad(set_to_none=True)

    yield update
