"""The candidate pretraining recipes ``benchmarks/recipe.py`` compares: each a config for ``ctmae pretrain`` and the
line saying why it is a candidate; a ``steps`` entry fixes its step count instead of the wall-clock budget."""

from __future__ import annotations

TINY = {"model": {"size": "tiny"}, "data": {"crops_per_volume": 4}, "train": {"batch_size": 4, "lr": 1e-3}}


def _merged(base: dict, sections: dict) -> dict:
    """A copy of the config ``base`` with each of ``sections``' values merged into its section."""
    config = {k: dict(v) for k, v in base.items()}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _recipe(why: str, **sections: dict) -> dict:
    """TINY with ``sections`` merged in, and the line saying why it is a candidate."""
    return {"why": why, "config": _merged(TINY, sections)}


RECIPES: dict[str, dict] = {
    "p16-linear": _recipe("the plain MAE: tiny, patch 16, crop 96, linear head, loss on 25% of the tokens"),
    "p16-all": _recipe("the same, loss on every hidden token", mask={"predict_ratio": 0.75}),
    "p16-upsample": _recipe(
        "patch 16 with the upsampling head, loss on every hidden token",
        model={"head": "upsample"},
        mask={"predict_ratio": 0.75},
    ),
    "p8-c64": _recipe(
        "patch 8 (Primus), crop 64, linear head, loss on every hidden token",
        model={"patch": 8},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
    ),
    "p8-c64-upsample": _recipe(
        "patch 8, crop 64, upsampling head, loss on every hidden token",
        model={"patch": 8, "head": "upsample"},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
    ),
    "p16-lr3": _recipe(
        "patch 16, loss on every hidden token, learning rate 3e-3",
        mask={"predict_ratio": 0.75},
        train={"lr": 3e-3},
    ),
    "p16-dec192": _recipe(
        "patch 16, loss on every hidden token, decoder 192 wide (the linear head's rank 64 -> 192)",
        model={"dec_dim": 192},
        mask={"predict_ratio": 0.75},
    ),
    "p16-depth6": _recipe(
        "patch 16, loss on every hidden token, 6 encoder blocks (twice the steps; UNETR needs 12)",
        model={"depth": 6},
        mask={"predict_ratio": 0.75},
    ),
    "p8-c64-lr3": _recipe(
        "patch 8, crop 64, loss on every hidden token, learning rate 3e-3",
        model={"patch": 8},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
        train={"lr": 3e-3},
    ),
    "p16-fill": _recipe(
        "patch 16, loss on every hidden token, the decoder predicts the residual over a gaussian fill (sigma 4)",
        model={"fill_sigma": 4.0},
        mask={"predict_ratio": 0.75},
    ),
    "p8-c64-fill": _recipe(
        "patch 8, crop 64, loss on every hidden token, residual over a gaussian fill (sigma 4)",
        model={"patch": 8, "fill_sigma": 4.0},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
    ),
    "p8-c64-fill8": _recipe(
        "patch 8, crop 64, loss on every hidden token, residual over a gaussian fill (sigma 8)",
        model={"patch": 8, "fill_sigma": 8.0},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
    ),
    "p16-c64-fill": _recipe(
        "patch 16, crop 64, loss on every hidden token, residual over a gaussian fill (sigma 4)",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
    ),
    "p16-c64-fill-b8": _recipe(
        "patch 16, crop 64, residual over a gaussian fill (sigma 4), batch 8",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8},
    ),
    "p16-c64-fill-lr2": _recipe(
        "patch 16, crop 64, residual over a gaussian fill (sigma 4), learning rate 2e-3",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"lr": 2e-3},
    ),
    "p16-c64-fill-r60": _recipe(
        "p16-c64-fill trained with 60% hidden (scored at 75%): more context per crop while learning",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"ratio": 0.6, "predict_ratio": 0.6},
    ),
    "p16-c64-r60": _recipe(
        "p16-c64-all trained with 60% hidden (scored at 75%)",
        data={"crop": 64},
        mask={"ratio": 0.6, "predict_ratio": 0.6},
    ),
    "p16-c64-r50": _recipe(
        "p16-c64-all trained with 50% hidden (scored at 75%)",
        data={"crop": 64},
        mask={"ratio": 0.5, "predict_ratio": 0.5},
    ),
    "p16-c64-fill-random": _recipe(
        "p16-c64-fill trained with random masks (scored under block and random masks)",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"kind": "random", "predict_ratio": 0.75},
    ),
    "fill-untrained": _recipe(
        "reference, not a recipe: the p16-c64-fill model after one step at learning rate 1e-12, i.e. its own "
        "coarse gaussian fill with a zero residual",
        model={"fill_sigma": 4.0},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"lr": 1e-12},
    )
    | {"steps": 1},
    "p16-c64-fillq": _recipe(
        "p16-c64-fill whose decoder queries also read their patch's fills at 2-16 voxels and the visible support",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
    ),
    "p8-c64-fillq": _recipe(
        "p8-c64-fill with the fill-reading queries of p16-c64-fillq",
        model={"patch": 8, "fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"block": 4, "predict_ratio": 0.75},
    ),
    "p16-c64-fillq-dec2": _recipe(
        "p16-c64-fillq with a decoder of 2 blocks, 128 wide",
        model={"fill_sigma": 4.0, "fill_queries": True, "dec_depth": 2, "dec_dim": 128},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
    ),
    "p16-c64-fillq-lr2": _recipe(
        "p16-c64-fillq at learning rate 2e-3",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"lr": 2e-3},
    ),
    "p16-c64-fillq-b8": _recipe(
        "p16-c64-fillq at batch 8",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8},
    ),
    "p16-c64-fillq-b8-lr2": _recipe(
        "p16-c64-fillq at batch 8 and learning rate 2e-3",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 2e-3},
    ),
    "p16-c64-fillq-lr3": _recipe(
        "p16-c64-fillq at learning rate 3e-3",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"lr": 3e-3},
    ),
    "p16-c64-fillq-b8-lr3": _recipe(
        "p16-c64-fillq at batch 8 and learning rate 3e-3",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 3e-3},
    ),
    "p16-c64-fillq-b8-lr5": _recipe(
        "p16-c64-fillq at batch 8 and learning rate 0.005",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 0.005},
    ),
    "p16-c64-fillq-b16-lr3": _recipe(
        "p16-c64-fillq at batch 16 and learning rate 0.003",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 16, "lr": 0.003},
    ),
    "p16-c64-fillq-b16-lr5": _recipe(
        "p16-c64-fillq at batch 16 and learning rate 0.005",
        model={"fill_sigma": 4.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 16, "lr": 0.005},
    ),
    "p16-c64-fillq8-b8-lr3": _recipe(
        "p16-c64-fillq-b8-lr3 over a fill of sigma 8 (the width the best fill takes on 2 of the 3 block masks)",
        model={"fill_sigma": 8.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 3e-3},
    ),
    "p16-c64-fillq8-smooth-b8-lr3": _recipe(
        "p16-c64-fillq8-b8-lr3 with the smooth head: a residual on the fill's 4x coarser grid, continuous across "
        "patch borders",
        model={"fill_sigma": 8.0, "fill_queries": True, "head": "smooth"},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 3e-3},
    ),
    "p16-c64-fillq8-b8-lr3-flip": _recipe(
        "p16-c64-fillq8-b8-lr3 with crops mirrored left-right at random",
        model={"fill_sigma": 8.0, "fill_queries": True},
        data={"crop": 64, "flip": True},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 3e-3},
    ),
    "p16-c64-fillq8-b8-lr3-seed1": _recipe(
        "p16-c64-fillq8-b8-lr3 with training seed 1 (weights, crops and masks): the run-to-run spread",
        model={"fill_sigma": 8.0, "fill_queries": True},
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
        train={"batch_size": 8, "lr": 3e-3, "seed": 1},
    ),
    "p16-c64-all": _recipe(
        "patch 16, crop 64 (more steps in the budget), loss on every hidden token",
        data={"crop": 64},
        mask={"predict_ratio": 0.75},
    ),
}


# The plain demo recipe (p16-c64-fillq8-b8-lr3 for a fixed 1400 steps), the base of the demo-* variants below;
# demo-cpv8-zoom plus contrast is the demo (ctmae/recipes/demo.yaml).
DEMO_S5 = {
    "model": {"size": "tiny", "fill_sigma": 8.0, "fill_queries": True},
    "data": {"crop": 64, "crops_per_volume": 4},
    "mask": {"predict_ratio": 0.75},
    "train": {"steps": 1400, "batch_size": 8, "lr": 3e-3, "log_every": 10},
}


def _demo(why: str, seed: int, **sections: dict) -> dict:
    """DEMO_S5 at training seed ``seed``, ``sections`` merged in, for its fixed number of steps."""
    config = _merged(DEMO_S5, {**sections, "train": {**sections.get("train", {}), "seed": seed}})
    return {"why": f"{why} (training seed {seed})", "config": config, "steps": config["train"]["steps"]}


RECIPES["demo-cpv8-zoom-untrained"] = {
    "why": "reference, not a recipe: the demo-cpv8-zoom model after one step at learning rate 1e-12, i.e. its own "
    "gaussian fill (sigma 8) with a zero residual",
    "config": {**DEMO_S5, "data": {"crop": 64, "crops_per_volume": 8, "zoom": 0.25}, "train": {"lr": 1e-12}},
    "steps": 1,
}
# The demo's recipe variants at their fixed step count on the demo data, at three training seeds each.
for _seed in range(3):
    _tag = f"-seed{_seed}" if _seed else ""
    RECIPES[f"demo{_tag}"] = _demo("the plain demo recipe: p16-c64-fillq8-b8-lr3 for 1400 steps", _seed)
    RECIPES[f"demo-cpv8{_tag}"] = _demo(
        "the demo with 8 crops per visit (a batch of 8 from one scan)", _seed, data={"crops_per_volume": 8}
    )
    RECIPES[f"demo-2000{_tag}"] = _demo("the demo for 2000 steps", _seed, train={"steps": 2000})
    RECIPES[f"demo-zoom{_tag}"] = _demo("the demo with crops scaled by 1/1.25 to 1.25", _seed, data={"zoom": 0.25})
    RECIPES[f"demo-cpv8-zoom{_tag}"] = _demo(
        "the demo with 8 crops per visit and crops scaled by 1/1.25 to 1.25",
        _seed,
        data={"crops_per_volume": 8, "zoom": 0.25},
    )
