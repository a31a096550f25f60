"""The masking registry (a toy strategy registered here trains), and the masks: exact ratio, block contiguity,
determinism, equal visible counts, identity and noise modes."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_body_scans
from ctmae.cli import app
from ctmae.io.discovery import find_volumes
from ctmae.mae.config import MaskConfig, RunConfig
from ctmae.mae.masking import (
    MASKS,
    MaskStrategy,
    corrupt,
    num_masked,
    num_predicted,
    register,
    sample_mask,
    unregister,
)
from ctmae.mae.train import pretrain
from ctmae.preprocess.build_cache import build_cache

GRID = (6, 6, 6)
CPU = torch.device("cpu")


def draw(cfg: MaskConfig, seed: int = 0, batch: int = 4, grid=GRID):
    return sample_mask(cfg, batch, grid, torch.Generator().manual_seed(seed), CPU)


def face_contacts(mask: torch.Tensor, grid) -> int:
    """Masked/visible neighbour pairs along the three axes: low for compact blocks, high for scattered tokens."""
    m = mask.view(-1, *grid)
    return sum(int((m.narrow(a, 1, g - 1) != m.narrow(a, 0, g - 1)).sum()) for a, g in zip((1, 2, 3), grid))


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75, 0.9])
def test_exact_ratio_and_equal_visible_counts(kind, ratio):
    m = draw(MaskConfig(kind=kind, ratio=ratio, predict_ratio=1.0))
    n = round(ratio * 216)
    assert m.mask.sum(1).tolist() == [n] * 4
    assert m.ids_pred.shape == (4, n) and m.ids_keep.shape == (4, 216 - n)
    for b in range(4):  # keep and pred partition the tokens, and the bool mask agrees
        assert sorted(m.ids_keep[b].tolist() + m.ids_pred[b].tolist()) == list(range(216))
        assert m.mask[b, m.ids_pred[b]].all() and not m.mask[b, m.ids_keep[b]].any()


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize(("ratio", "predict_ratio", "expected"), [(0.75, 0.25, 54), (0.75, 0.5, 108), (0.3, 0.5, 65)])
def test_predicted_tokens_are_a_random_subset_of_the_hidden_ones(kind, ratio, predict_ratio, expected):
    """predict_ratio of all tokens, capped at the hidden ones; different subsets per sample, hidden tokens only."""
    m = draw(MaskConfig(kind=kind, ratio=ratio, predict_ratio=predict_ratio))
    assert m.ids_pred.shape == (4, expected)
    for b in range(4):
        ids = m.ids_pred[b]
        assert m.mask[b, ids].all() and len(set(ids.tolist())) == expected and torch.equal(ids, ids.sort().values)
    if expected < m.mask.sum(1)[0]:
        hidden_rank = [(m.mask[b].cumsum(0)[m.ids_pred[b]]).tolist() for b in range(4)]  # positions among hidden
        assert len({tuple(r) for r in hidden_rank}) == 4  # not the same slots of each sample's hidden list
    assert num_predicted(MaskConfig(kind=kind, ratio=ratio, predict_ratio=predict_ratio), 216) == expected


def test_block_masks_are_contiguous_cuboids():
    block = draw(MaskConfig(kind="block", ratio=0.5, block=3), batch=16)
    rand = draw(MaskConfig(kind="random", ratio=0.5), batch=16)
    assert face_contacts(block.mask, GRID) < 0.5 * face_contacts(rand.mask, GRID)


def test_block_edge_one_is_random_patches_and_large_blocks_fill_cells():
    # With block 6 on a 6³ grid, the masked set is a union of offset-cut cuboid cells: each is a full box.
    m = draw(MaskConfig(kind="block", ratio=0.5, block=6), batch=8)
    grid = m.mask.view(8, *GRID)
    for b in range(8):
        idx = grid[b].nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        box = (hi - lo + 1).prod().item()
        assert box >= idx.shape[0]  # inside its bounding box
    assert num_masked(MaskConfig(kind="block", ratio=0.5, block=1), 216) == 108


def test_determinism_under_a_seed():
    cfg = MaskConfig(kind="block")
    a, b, c = draw(cfg, seed=7), draw(cfg, seed=7), draw(cfg, seed=8)
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("kind", ["none", "noise"])
def test_none_and_noise_leave_every_token_visible(kind):
    m = draw(MaskConfig(kind=kind, predict_ratio=1.0))
    assert not m.mask.any()
    assert m.ids_keep.shape == (4, 216) and torch.equal(m.ids_keep, m.ids_pred)
    assert draw(MaskConfig(kind=kind)).ids_pred.shape == (4, 54)  # the loss covers predict_ratio of the tokens


def test_noise_corrupts_every_voxel_and_other_kinds_do_not():
    x = torch.zeros(2, 1, 8, 8, 8)
    noisy = corrupt(x, MaskConfig(kind="noise", noise_std=0.2), torch.Generator().manual_seed(0))
    assert (noisy != 0).all() and 0.15 < noisy.std().item() < 0.25
    assert corrupt(x, MaskConfig(kind="block"), torch.Generator()) is x


def test_the_registry_holds_the_built_in_strategies_and_drives_config_and_cli():
    assert list(MASKS) == ["block", "random", "none", "noise"]
    assert [k for k, s in MASKS.items() if s.hides_tokens] == ["block", "random"]
    assert [k for k, s in MASKS.items() if s.corrupt is not None] == ["noise"]
    with pytest.raises(ValueError, match="unknown mask kind 'holes'; choose one of block, random, none, noise"):
        RunConfig.from_dict({"mask": {"kind": "holes"}})
    with pytest.raises(ValueError, match="mask ratio"):
        RunConfig.from_dict({"mask": {"kind": "random", "ratio": 1.0}})
    RunConfig.from_dict({"mask": {"kind": "noise", "ratio": 1.0}})  # the ratio means nothing to noise
    for command in ("pretrain", "reconstruct"):
        assert "block|random|none|noise" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


def test_a_strategy_is_checked_when_registered():
    with pytest.raises(ValueError, match="already registered"):
        register(MaskStrategy("block", "again", scores=MASKS["block"].scores, uses_ratio=True))
    with pytest.raises(ValueError, match="hides MaskConfig.ratio"):
        MaskStrategy("odd", "hides tokens without a ratio", scores=MASKS["block"].scores)


def _slab_scores(cfg, batch, grid, generator, device):
    """Whole z-slabs of tokens: a random rank per slab (last grid axis) plus a tie-break inside it. (B, L)."""
    rank = torch.rand(batch, grid[2], generator=generator, device=device).argsort(1).argsort(1)  # (B, gw)
    within = torch.rand(batch, *grid, generator=generator, device=device)  # (B, gd, gh, gw)
    return (rank[:, None, None, :] + within).reshape(batch, -1)


@pytest.fixture
def slab():
    strategy = register(MaskStrategy("slab", "hides whole z-slabs of tokens", scores=_slab_scores, uses_ratio=True))
    yield strategy
    unregister("slab")
    assert "slab" not in MASKS


def test_a_toy_strategy_registered_in_a_test_masks_and_trains(slab, tmp_path):
    m = draw(MaskConfig(kind="slab", ratio=0.5, predict_ratio=1.0))
    per_slab = m.mask.view(4, *GRID).sum((1, 2))  # (B, gw): hidden tokens in each z-slab
    assert (per_slab == 36).sum(1).tolist() == [3] * 4 and (per_slab == 0).sum(1).tolist() == [3] * 4
    cfg = RunConfig.from_dict(
        {
            "model": {"size": "tiny", "patch": 8},
            "data": {"crop": 32, "workers": 0, "cache_dir": str(tmp_path / "cache")},
            "mask": {"kind": "slab", "ratio": 0.5},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1},
        }
    )
    sources, _ = find_volumes([write_body_scans(tmp_path / "scans", 1)])
    good, _ = build_cache(sources, cfg.preprocess)
    result = pretrain(cfg, good, tmp_path / "run")
    assert result["steps"] == 2 and math.isfinite(result["last_loss"])
    assert "kind: slab" in (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")
