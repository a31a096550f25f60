"""``ctmae export``: write a pretrained encoder as safetensors + config.json + model card, or as a MONAI bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
) -> None:
    """Export the encoder of a pretrained MAE for MONAI's ViT / UNETR, with its preprocessing and a model card."""

    def body() -> None:
        from ctmae.share.export import FORMATS, OutputExists
        from ctmae.share.export import export as run_export

        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
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
