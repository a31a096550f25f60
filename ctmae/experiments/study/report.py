"""The study's outputs, gathered from whatever points have finished: study.md (one row per point, the ranking of
corruptions, flags), study.json (the manifest and every point's figures) and study.png (``chart.py``).

Everything is rebuilt from the points' status.json files, so ``ctmae study --report`` after a SLURM array (or a
killed study) writes the same files as the end of a full run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctmae.draw.charts import write_study_chart
from ctmae.experiments.study.plan import MANIFEST, Point
from ctmae.experiments.study.run import read_status
from ctmae.runtime.files import atomic_write_text

EXPECTED = ("block", "random", ("none", "noise"))  # the ranking the idea behind ctmae predicts
DECODER_FLAG = "decoder may be doing the work"


def gather(out: Path, points: Sequence[Point], manifest: dict[str, Any]) -> dict[str, Any]:
    """Read every point's status and write study.json, study.md and study.png; returns study.json's content."""
    rows = [_row(p, read_status(out, p)) for p in points]
    study = {
        "manifest": manifest,
        "points": rows,
        "done": sum(r["status"] == "done" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "ranking": ranking(rows),
    }
    atomic_write_text(out / MANIFEST, json.dumps(study, indent=2) + "\n")
    atomic_write_text(out / "study.md", markdown(study))
    write_study_chart(out / "study.png", study)
    return study


def _row(point: Point, status: dict[str, Any] | None) -> dict[str, Any]:
    m = point.cfg.mask
    row = {
        **point.describe(),
        "mask": m.kind,
        "ratio": m.ratio if m.kind in ("block", "random") else None,  # none and noise hide no token
        "block": m.block if m.kind == "block" else None,
        "status": "pending" if status is None else status["status"],
        "reason": (status or {}).get("reason", ""),
        "figures": (status or {}).get("figures", {}),
    }
    f = row["figures"]
    gain, probe, floor = f.get("psnr_gain"), f.get("probe_dice"), f.get("probe_floor")
    row["decoder_flag"] = bool(
        gain is not None and gain > 0 and probe is not None and floor is not None and probe <= floor
    )
    return row


def ranking(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Corruptions ranked by their best probe Dice, and whether that agrees with block > random > none/noise."""
    best: dict[str, float] = {}
    for r in rows:
        dice = r["figures"].get("probe_dice")
        if r["status"] == "done" and dice is not None:
            best[r["mask"]] = max(best.get(r["mask"], -math.inf), dice)
    order = sorted(best, key=lambda k: -best[k])
    baselines = [best[k] for k in ("none", "noise") if k in best]
    if "block" not in best or "random" not in best or not baselines:
        verdict = None
        line = "ranking not judged: it needs finished points of block, random and none or noise with a probe Dice"
    else:
        verdict = best["block"] > best["random"] > max(baselines)
        measured = " > ".join(f"{k} {best[k]:.3f}" for k in order)
        word = "agrees" if verdict else "does not agree"
        line = f"measured ranking by best probe Dice: {measured}; this {word} with block > random > none/noise"
    return {"best_probe_dice": best, "order": order, "agrees": verdict, "line": line}


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(study: dict[str, Any]) -> str:
    """study.md: settings, one row per point, the ranking line, flags, then how to read it."""
    man, rows = study["manifest"], study["points"]
    grid_keys = [k for k in man["grid"] if k not in ("mask.kind", "mask.ratio", "mask.block")]
    shots = sorted({k for r in rows for k in r["figures"].get("fewshot_dice", {})}, key=int)
    lines = ["# ctmae study", ""]
    lines.append(
        f"{len(man['scans'])} training file(s), {len(man['eval_data'])} evaluation file(s); model "
        f"{man['base']['model']['size']}, crop {man['base']['preprocess']['crop']}, "
        f"patch {man['base']['model']['patch']}, "
        f"{man['steps']} steps per point, seed {man['seed']}. {study['done']} of {len(rows)} point(s) done"
        + (f", {study['failed']} failed." if study["failed"] else ".")
    )
    head = ["point", "mask", "ratio", "block", *grid_keys, "status", "final loss", "masked PSNR", "gain over fill"]
    head += ["probe Dice", "probe floor", "probe scratch", *(f"k={k} Dice" for k in shots), "flag"]
    lines += _classes_lines(rows)
    lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        f = r["figures"]
        cells = [r["folder"], r["mask"], _f(r["ratio"], 2), _f(r["block"])]
        cells += [_f(r["overrides"].get(k)) for k in grid_keys]
        cells += [r["status"], _f(f.get("final_loss"), 4), _f(f.get("masked_psnr"), 2), _f(f.get("psnr_gain"), 2)]
        cells += [_f(f.get("probe_dice")), _f(f.get("probe_floor")), _f(f.get("probe_scratch"))]
        cells += [_f(f.get("fewshot_dice", {}).get(k)) for k in shots]
        cells.append(DECODER_FLAG if r["decoder_flag"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Ranking**: {study['ranking']['line']}.", ""]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"- {r['folder']} failed: {r['reason']}")
        if r["decoder_flag"]:
            lines.append(
                f"- {r['folder']}: reconstruction beats the best trivial fill but the probe is no better than the "
                f"raw-intensity floor: {DECODER_FLAG} (try a shallower or narrower decoder)"
            )
    lines += ["", HOW_TO_READ]
    return "\n".join(lines) + "\n"


def _classes_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The evaluation's classes (every point is evaluated on the same ones) and the best point's probe Dice of each."""
    done = [r for r in rows if r["figures"].get("classes")]
    if not done:
        return []
    lines = ["", f"Classes evaluated: {', '.join(done[0]['figures']['classes'])}."]
    scored = [r for r in done if r["figures"].get("probe_dice_per_class")]
    if scored:
        best = max(scored, key=lambda r: r["figures"]["probe_dice"])
        per = zip(best["figures"]["classes"], best["figures"]["probe_dice_per_class"])
        lines.append(
            f"Probe Dice per class of the best point ({best['folder']}): {', '.join(f'{n} {d:.3f}' for n, d in per)}."
        )
    return lines


HOW_TO_READ = """## How to read this study

- Every point pretrains the same model on the same scans with the same seed and steps, changing only its grid
  keys, then runs `ctmae evaluate` (points/NNN-name/eval/report.md) on the same test cases with the same settings.
- **masked PSNR** is the MAE's PSNR on hidden voxels under block masks; **gain over fill** subtracts the better of
  the gaussian and mean fills. Above 0, the model infers hidden anatomy better than smoothing does.
- **probe Dice** is a linear probe on the frozen encoder; **probe floor** is the same probe on the raw intensity of
  each patch; **probe scratch** the mean probe over three randomly initialised encoders of the same size. What
  counts is the probe's margin over the floor and over scratch, compared between points.
- **Ranking** compares the best probe Dice of each corruption with the expected block > random > none/noise.
  With few steps, few scans or few test cases the differences are within noise: repeat with other seeds before
  trusting an order.
- **decoder may be doing the work**: the reconstruction is good but the encoder's features are no better than raw
  intensity; a deep or wide decoder can learn to inpaint from the visible tokens without a useful encoder.
- study.png: probe Dice against mask ratio, one line per corruption (none and noise hide no token: flat lines),
  and the best probe Dice per corruption next to the floor. study.json holds every figure.
"""
