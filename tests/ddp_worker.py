"""Run under torchrun by test_distributed.py: pretrain through the library, then save this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ctmae.io.discovery import find_volumes
from ctmae.mae.config import RunConfig
from ctmae.mae.train import pretrain
from ctmae.preprocess.build_cache import build_cache
from ctmae.runtime.distributed import barrier, cleanup, setup

if __name__ == "__main__":
    scans, out, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    dist = setup("cpu")
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8},
            "data": {"crop": 32, "workers": 0, "cache_dir": cache, "crops_per_volume": 1},
            "train": {"steps": 4, "batch_size": 1, "log_every": 1, "device": "cpu"},
        }
    )
    sources, _ = find_volumes([scans])
    build_cache(sources[dist.rank :: dist.world], cfg.preprocess)
    barrier(dist)
    result = pretrain(cfg, sources, out, dist=dist)
    torch.save(result["model"].state_dict(), out / f"rank{dist.rank}.pt")
    cleanup(dist)
