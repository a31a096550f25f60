"""``ctmae mask-check``: are the labelled objects larger than a mask block? Sizes, hidden shares, a recommendation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ctmae.cli.common import INPUTS_HELP, UsageError, app, console, report_skipped, run_command


@app.command("mask-check")
def mask_check(
    labels: Annotated[list[Path], typer.Argument(help=f"Label maps. {INPUTS_HELP}", show_default=False)],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Take crop, patch, spacing and mask settings from this MAE checkpoint.")
    ] = None,
    crop: Annotated[Optional[int], typer.Option(help="Crop edge in voxels (default: 96)")] = None,
    patch: Annotated[Optional[int], typer.Option(help="Patch edge in voxels (default: 16)")] = None,
    block: Annotated[Optional[int], typer.Option(help="Block edge in patches (default: 2)")] = None,
    mask_ratio: Annotated[Optional[float], typer.Option(help="Share of patches hidden (default: 0.75)")] = None,
    spacing: Annotated[Optional[float], typer.Option(help="Isotropic spacing in mm (default: 1.5)")] = None,
    tolerance: Annotated[
        float,
        typer.Option(help="Tolerated rise, over block 1's, of the share of objects one mask hides entirely."),
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seeds the simulated masks.")] = 0,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Folder for mask_check.json and overlay.png.")
    ] = None,
) -> None:
    """Measure labelled objects against the mask block: MAE learns little about objects one block hides whole."""

    def body() -> None:
        from ctmae.experiments.mask_check import check_masking, write_overlay
        from ctmae.io.checks import InputError
        from ctmae.io.discovery import find_volumes, skipped_only
        from ctmae.mae.checkpoint import load_checkpoint
        from ctmae.mae.config import RunConfig

        cfg = load_checkpoint(checkpoint)["config"] if checkpoint else RunConfig()
        given = {
            "data": {k: v for k, v in {"crop": crop, "spacing": (spacing,) * 3 if spacing else None}.items() if v},
            "model": {"patch": patch} if patch else {},
            "mask": {k: v for k, v in {"block": block, "ratio": mask_ratio}.items() if v is not None},
        }
        try:
            cfg = cfg.replace(**given)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not 0.0 <= tolerance <= 1.0:
            raise UsageError(f"--tolerance must be between 0 and 1, got {tolerance}")
        sources, problems = find_volumes([str(p) for p in labels], skip_labels=False)
        report_skipped(problems)
        if not sources:
            raise InputError(f"no readable label map among the inputs ({len(skipped_only(problems))} skipped)")
        result = check_masking(sources, cfg, tolerance, seed)
        _print(result)
        if out is not None:
            from ctmae.runtime.files import atomic_write_text

            atomic_write_text(out / "mask_check.json", json.dumps(result, indent=2) + "\n")
            largest = max(result["objects"], key=lambda o: o["voxels"])
            source = next(s for s in sources if s.id == largest["label"])
            write_overlay(out / "overlay.png", source, largest, cfg, seed)
            console.print(f"wrote {out / 'mask_check.json'} and {out / 'overlay.png'}", highlight=False, soft_wrap=True)

    run_command(body)


def _print(result: dict) -> None:
    table = Table(title="labelled objects against the mask block")
    for column in ("class", "objects", "smallest extent (mm)", "median extent (mm)", "hidden whole by one mask"):
        table.add_column(column)
    for cls in sorted({o["class"] for o in result["objects"]}):
        objects = [o for o in result["objects"] if o["class"] == cls]
        extents = sorted(max(o["extent_mm"]) for o in objects)
        share = sum(o["hidden_share"] for o in objects) / len(objects)
        table.add_row(str(cls), str(len(objects)), f"{extents[0]:g}", f"{extents[len(extents) // 2]:g}", f"{share:.0%}")
    console.print(table)
    edge = "x".join(f"{e:g}" for e in result["block_edge_mm"])
    console.print(
        f"block edge {edge} mm ({result['mask']['block']} patches of {result['patch']} voxels at "
        f"{result['spacing_mm'][0]:g} mm): one mask hides {result['hidden_share']:.0%} of the objects entirely",
        highlight=False,
        soft_wrap=True,
    )
    by_block = ", ".join(f"{b}: {s:.0%}" for b, s in result["hidden_share_by_block"].items())
    console.print(
        f"recommended: --block {result['recommended_block']}, the largest whose share is within "
        f"{result['tolerance']:.0%} of block 1's (share by block: {by_block})",
        highlight=False,
        soft_wrap=True,
    )
