"""What an evaluation does: protocols, shots, seeds and sizes, one frozen dataclass recorded in every report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("probe", "fewshot", "recon")


@dataclass(frozen=True)
class EvalSettings:
    protocols: tuple[str, ...] = PROTOCOLS  # which protocols run, in this order of preference
    shots: tuple[int, ...] = (1, 2)  # labelled training cases per few-shot run
    repeats: int = 2  # few-shot runs per number of shots (seeds 0..repeats-1, subsets drawn per repeat)
    seed: int = 0  # picks the test cases and the few-shot subsets; seeds the probe and the recon masks
    test_cases: int | None = None  # held-out cases; None: a fifth of the cases, leaving max(shots) to train on
    steps: int = 500  # fine-tuning steps per few-shot run
    lr: float = 1e-4  # fine-tuning peak learning rate (as finetune-seg)
    batch_size: int = 2  # fine-tuning crops per step
    crop: int | None = None  # fine-tuning crop / sliding-window edge; None: each checkpoint's crop
    feature_size: int = 16  # UNETR's convolutional feature width
    probe_steps: int = 300  # full-batch optimiser steps of the linear probe
    probe_lr: float = 0.05  # Adam learning rate of the linear probe (standardised features)
    probe_tokens: int = 200_000  # at most this many training tokens (a seeded subsample beyond)
    # randomly initialised encoders the scratch probe averages (seeds seed, seed+1, ...): one draw's Dice moves with
    # its initialisation (by up to 0.15 on an organ in a single labelled volume), so one draw is a noisy yardstick
    probe_draws: int = 3
    recon_windows: int = 4  # crops per test scan for the recon protocol
    batch_windows: int = 4  # sliding windows per forward pass
    device: str = "auto"  # auto | cpu | cuda
    classes: str = ""  # --classes as given ("": every label value, as numbered)

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"--protocols must name some of {', '.join(PROTOCOLS)}, got {','.join(self.protocols)}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"--shots must be positive numbers of cases, got {','.join(map(str, self.shots))}")
        if self.repeats < 1 or self.steps < 1 or self.batch_size < 1 or self.recon_windows < 1:
            raise ValueError("--repeats, --steps, batch size and recon windows must be >= 1")
        if self.test_cases is not None and self.test_cases < 1:
            raise ValueError(f"--test-cases must be >= 1, got {self.test_cases}")
        if self.crop is not None and (self.crop < 16 or self.crop % 16):
            raise ValueError(f"--crop {self.crop} must be a positive multiple of 16 (UNETR's patch size)")
        if min(self.probe_steps, self.probe_tokens, self.probe_draws, self.feature_size, self.batch_windows) < 1:
            raise ValueError("probe steps, probe tokens, probe draws, feature size and batch windows must be >= 1")

    @property
    def max_shots(self) -> int:
        """Training cases the protocols need: the largest few-shot k, or one for the probe."""
        return max(self.shots) if "fewshot" in self.protocols else 1

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def result_key(self) -> dict[str, Any]:
        """The settings that change figures: a resumed evaluation must match them. Not the device, and not the
        protocols (a resumed evaluation may add one; the case split is checked on its own)."""
        d = self.to_dict()
        d.pop("device")
        d.pop("protocols")
        return d
