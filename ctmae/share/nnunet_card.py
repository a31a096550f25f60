"""The README of an nnU-Net export (``ctmae export --format nnunet``): the commands that fine-tune the pretrained
Primus in nnU-Net, the preprocessing it expects, what is and is not transferred."""

from __future__ import annotations

from typing import Any


def nnunet_card(config: dict[str, Any]) -> str:
    """Markdown for an nnU-Net export's ``config.json`` content (``ctmae.share.nnunet.export_nnunet``)."""
    pre, train = config["preprocessing"], config["training"]
    lo, hi = pre["hu_window"]
    spacing_zyx = list(reversed(pre["spacing"]))
    trainer = config["trainer"] or "YOUR_PRIMUS_TRAINER"
    size = "x".join(str(s) for s in config["patch_size"])
    tiny = (
        ""
        if config["trainer"]
        else (
            f"\nThe `{config['size']}` preset has no nnU-Net trainer: write one like `nnUNet_Primus_S_Trainer` with "
            f"this encoder's width, depth and heads (`ctmae_config` in config.json) into nnU-Net's trainer folder.\n"
        )
    )
    return f"""# Pretrained Primus-{config["size"].upper()} for nnU-Net

nnU-Net's Primus encoder (8³ patch embedding and EVA blocks, `{config["network"]}`) pretrained by ctmae's masked
autoencoder on CT for {train["step"]} steps. `{config["weights"]["file"]}` holds every tensor of the network that
`{trainer}` builds for a {size} patch and {config["num_classes"]} output channels, as `nnUNetv2_train
-pretrained_weights` needs it.
{tiny}
## Fine-tune

```bash
# dataset.json of DatasetXXX_Name: add "overwrite_image_reader_writer": "NibabelIOWithReorient"
nnUNetv2_plan_and_preprocess -d XXX -c 3d_fullres --verify_dataset_integrity
PLANS=$nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans.json
python -c "from ctmae.share.nnunet import apply_plans; apply_plans('$PLANS', 'plans_fragment.json')"
nnUNetv2_preprocess -d XXX -c 3d_fullres
nnUNetv2_train XXX 3d_fullres 0 -tr {trainer} -pretrained_weights {config["weights"]["file"]}
```

The second preprocessing run applies the merged plans: `plans_fragment.json` sets

- **Intensity**: the encoder learned from HU clipped to [{lo:g}, {hi:g}] and scaled to 0..1. nnU-Net's
  `CTNormalization` clips to the foreground's 0.5 and 99.5 percentiles and subtracts the foreground mean, divides by
  its standard deviation: different numbers. The fragment's `foreground_intensity_properties_per_channel` makes it
  compute ctmae's scaling exactly: percentiles {lo:g} and {hi:g}, mean {lo:g}, std {hi - lo:g}.
- **Spacing**: {spacing_zyx} mm in nnU-Net's (z, y, x) order, the spacing the encoder learned at.
- **Patch size**: {config["patch_size"]}; the encoder was pretrained on {config["pretraining_crop"]} crops, and its
  absolute position table is {config["position_table"]} (the rotary encoding needs no change).
- **Axes**: `NibabelIOWithReorient` and no transposition, so nnU-Net's arrays are ctmae's RAS volumes with the axes
  reversed, the order the encoder was trained in.

## What is transferred

- Transferred: {"; ".join(config["transferred"])}.
- Not transferred: {"; ".join(config["not_transferred"])}. Fine-tuning adds nnU-Net's stochastic depth (0.2), which
  has no weights.

## Pretraining

| | |
|---|---|
| Preset | {config["size"]} |
| Steps | {train["step"]} |
| Batch, learning rate | {train["batch_size"]}, {train["lr"]:g} |
| Mask | {train["mask"]["kind"]}, ratio {train["mask"]["ratio"]:g}, predict ratio {train["mask"]["predict_ratio"]:g} |
| Spacing (RAS x, y, z) | {pre["spacing"]} mm |
| Crop | {pre["crop"]}³ voxels |

The whole ctmae config is `ctmae_config` in config.json.
"""
