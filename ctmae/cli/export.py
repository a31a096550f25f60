"""``ctmae export``: write a pretrained encoder as safetensors + config.json + model card, or as a MONAI bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctmae.cli.common import UsageError, app, console, run_command


@app.command()
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="An MAE checkpoint written by ctmae pretrain (.pt).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder (created; must be empty).")] = ...,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="safetensors: encoder.safetensors + config.json + README.md; monai-bundle: MONAI's layout."
        ),
    ] = "safetensors",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the contents of a non-empty export folder.")
    ] = False,
    patch_size: Annotated[
        Optional[str],
        typer.Option(help="nnunet: nnU-Net's patch size, one number or three (64 or 64,64,96); default: the crop."),
    ] = None,
    num_classes: Annotated[int, typer.Option(help="nnunet: output channels, background included.")] = 2,
) -> None:
    """Export the encoder of a pretrained MAE for MONAI's ViT / UNETR, with its preprocessing and a model card."""

    def body() -> None:
        from ctmae.share.export import FORMATS, OutputExists
        from ctmae.share.export import export as run_export

        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if fmt == "nnunet":
            _export_nnunet(checkpoint, out, overwrite, patch_size, num_classes)
            return
        if patch_size is not None:
            raise UsageError("--patch-size sizes the nnU-Net network: it goes with --format nnunet")
        try:
            config, files = run_export(checkpoint, out, fmt, overwrite)
        except OutputExists as e:
            raise UsageError(str(e)) from None
        arch, weights = config["architecture"], config["weights"]
        console.print(
            f"exported ViT ({arch['num_layers']} blocks, width {arch['hidden_size']}, {weights['tensors']} tensors, "
            f"sha256 {weights['sha256'][:16]}…) as {fmt}: {', '.join(str(p.relative_to(out)) for p in files)} "
            f"in {out}/",
            highlight=False,
            soft_wrap=True,
        )

    run_command(body)


def _export_nnunet(checkpoint: Path, out: Path, overwrite: bool, patch_size: Optional[str], num_classes: int) -> None:
    """``--format nnunet``: the weights file of ``nnUNetv2_train -pretrained_weights``, a plans fragment, a README."""
    from ctmae.share.export import OutputExists, export
    from ctmae.share.nnunet import patch_size_of

    try:
        size = patch_size_of([int(v) for v in patch_size.replace("x", ",").split(",")]) if patch_size else None
    except ValueError as e:
        raise UsageError(str(e) if "patch" in str(e) else f"--patch-size must be numbers, got {patch_size!r}") from None
    if num_classes < 2:
        raise UsageError(f"--num-classes counts the background too: at least 2, got {num_classes}")
    try:
        config, files = export(checkpoint, out, "nnunet", overwrite, size, num_classes)
    except OutputExists as e:
        raise UsageError(str(e)) from None
    if config["position_table"] != "as pretrained":
        console.print(
            f"note: the position table was resampled from the {config['pretraining_crop']} pretraining crop to the "
            f"{config['patch_size']} patch size",
            highlight=False,
            soft_wrap=True,
        )
    trainer = config["trainer"] or "a Primus trainer with these sizes"
    console.print(
        f"exported Primus-{config['size'].upper()} for nnU-Net ({trainer}, patch {config['patch_size']}, "
        f"{num_classes} classes): {', '.join(p.name for p in files)} in {out}/; commands in {out / 'README.md'}",
        highlight=False,
        soft_wrap=True,
    )
