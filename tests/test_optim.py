"""AdamW stepped inside backward: the same weights and optimiser state as stepping after backward, no gradients kept."""

from __future__ import annotations

import copy

import pytest
import torch

from ctmae.mae.config import RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import build_model
from ctmae.runtime.optim import StepInBackward, build_optimizer, updater

CFG = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}})
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def train(model, optimizer, update, steps: int = 3) -> None:
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 / (step + 1)  # a changing lr must reach the per-parameter steps
        mask = sample_mask(CFG.mask, 2, (4, 4, 4), torch.Generator().manual_seed(step), torch.device("cpu"))
        update(model(x, mask)[0])


def test_stepping_in_backward_equals_stepping_after_it():
    torch.manual_seed(0)
    a = build_model(CFG.model)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, CFG.train), build_optimizer(b, CFG.train)
    with (
        updater(a, opt_a, NO_SCALER, grad_clip=0.0) as in_backward,
        updater(b, opt_b, NO_SCALER, 0.0, world=2) as after,
    ):
        train(a, opt_a, in_backward)
        train(b, opt_b, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(list(a.parameters()))
    for i in state_a:
        assert all(torch.equal(state_a[i][k], state_b[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert all(p.grad is None for p in a.parameters()) and all(p.grad is None for p in b.parameters())


def test_in_backward_state_survives_a_state_dict_round_trip_and_hooks_are_removed():
    torch.manual_seed(0)
    a = build_model(CFG.model)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, CFG.train), build_optimizer(b, CFG.train)
    with updater(a, opt_a, NO_SCALER, 0.0) as update_a, updater(b, opt_b, NO_SCALER, 0.0) as update_b:
        train(a, opt_a, update_a, steps=2)
        train(b, opt_b, update_b, steps=2)
        opt_b.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # what --resume does: a new state dict
        train(a, opt_a, update_a, steps=2)
        train(b, opt_b, update_b, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.clone() for p in a.parameters()]
    a(torch.rand(2, 1, 32, 32, 32), sample_mask(CFG.mask, 2, (4, 4, 4), torch.Generator(), torch.device("cpu")))[
        0
    ].backward()  # after the run: a backward pass only fills gradients
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(p.grad is not None for p in a.parameters())


@pytest.mark.parametrize(("clip", "world", "fp16"), [(1.0, 1, False), (0.0, 2, False), (0.0, 1, True)])
def test_clipping_ddp_and_fp16_step_after_backward(monkeypatch, clip, world, fp16):
    made = []
    monkeypatch.setattr(StepInBackward, "__init__", lambda self, opt: made.append(opt))
    model = build_model(CFG.model)
    opt = build_optimizer(model, CFG.train)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    with updater(model, opt, scaler, clip, world):
        pass
    assert made == []
