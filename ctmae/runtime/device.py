"""Device and numeric precision of a run: CUDA when present, bf16 autocast on GPU, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

from ctmae.runtime.distributed import DistInfo


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a ValueError. Under torchrun each rank
    drives the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    if name == "cuda" and dist is not None and dist.world > 1:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU; half precision on CPU is refused (slow and unsupported by SDPA)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {name} needs a CUDA device; use fp32 on CPU")
    return name


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16/fp16 (resolved by ``resolve_precision``); nothing for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
