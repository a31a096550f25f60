"""The evaluation's outputs, built from the journal: report.json (every figure), report.md (tables a person reads),
cases.csv (one row per case and measure) and report.png (``ctmae.draw.charts``).

Everything is rebuilt from the finished units each time, so an interrupted evaluation leaves a report of what it
finished (``"complete": false``) and a resumed one rewrites it whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctmae.draw.charts import write_report_chart
from ctmae.experiments.evaluate.cases import EvalCases
from ctmae.experiments.evaluate.settings import EvalSettings
from ctmae.experiments.evaluate.subjects import Subject, Unit
from ctmae.runtime.files import atomic_write_text
from ctmae.seg.classes import ClassMap

FORMAT = 1
OUTPUTS = ("report.json", "report.md", "report.png", "cases.csv")


def write_report(
    out: Path,
    settings: EvalSettings,
    subjects: Sequence[Subject],
    cases: EvalCases,
    done: dict[str, dict[str, Any]],
    units: Sequence[Unit],
) -> dict[str, Any]:
    """Build the report from the finished units ``done`` and write every output atomically; returns report.json's
    content."""
    report = build_report(settings, subjects, cases, done, units)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write_text(out / "cases.csv", case_rows(report))
    write_report_chart(out / "report.png", report)
    return report


def build_report(
    settings: EvalSettings,
    subjects: Sequence[Subject],
    cases: EvalCases,
    done: dict[str, dict[str, Any]],
    units: Sequence[Unit],
) -> dict[str, Any]:
    """report.json's content: settings, subjects (checkpoint hashes), the case split and each protocol's figures."""
    fewshot: dict[str, dict[str, Any]] = {}
    for unit in units:
        if unit.protocol != "fewshot" or unit.id not in done:
            continue
        runs = fewshot.setdefault(unit.subject.slug, {}).setdefault(str(unit.k), {"runs": []})["runs"]
        runs.append({"repeat": unit.repeat, **done[unit.id]})
    for by_k in fewshot.values():
        for entry in by_k.values():
            entry.update(_spread([r["dice"] for r in entry["runs"]]))
    return {
        "format": FORMAT,
        "complete": all(u.id in done for u in units),
        "units_done": sum(u.id in done for u in units),
        "units_total": len(units),
        "settings": settings.to_dict(),
        "subjects": [s.describe() for s in subjects],
        "cases": {**cases.ids(), **cases.describe_classes()},
        "probe": {u.subject.slug: done[u.id] for u in units if u.protocol == "probe" and u.id in done},
        "fewshot": fewshot,
        "recon": {u.subject.slug: done[u.id] for u in units if u.protocol == "recon" and u.id in done},
        "problems": [s.fewshot_problem for s in subjects if s.kind == "pretrained" and s.fewshot_problem],
    }


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for one value) of the runs' Dice."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """report.md: the tables, then how to read them."""
    subjects = {s["slug"]: s for s in report["subjects"]}
    s, c = report["settings"], report["cases"]
    lines = ["# ctmae evaluate", ""]
    if not report["complete"]:
        done, total = report["units_done"], report["units_total"]
        lines += [f"**Incomplete**: {done} of {total} units finished; rerun with `--resume` to finish.", ""]
    lines += ["| encoder | kind | file | SHA-256 | steps | model | patch | crop | mask |", "|---" * 9 + "|"]
    for sub in report["subjects"]:
        sha = sub["sha256"][:12] if sub["sha256"] else ""
        lines.append(
            f"| {sub['label']} | {sub['kind']} | {sub['path']} | {sha} | {sub['step']} | {sub['model']} | "
            f"{sub['patch']} | {sub['crop']} | {sub['mask'] if sub['kind'] == 'pretrained' else ''} |"
        )
    lines += [
        "",
        f"Test cases ({len(c['test'])}, chosen with seed {s['seed']}): {', '.join(c['test'])}. "
        f"Training pool: {len(c['train_pool'])} case(s). Classes: {_classes_text(c)}, and background.",
        "",
    ]
    lines += _probe_table(report, subjects) + _fewshot_table(report, subjects) + _recon_table(report, subjects)
    for problem in report["problems"]:
        lines.append(f"- {problem}")
    lines += ["", HOW_TO_READ]
    return "\n".join(lines) + "\n"


def _probe_table(report: dict[str, Any], subjects: dict[str, dict]) -> list[str]:
    if not report["probe"]:
        return []
    names = class_names(report["cases"])
    head = "| features | mean Dice | " + " | ".join(names) + " | tokens | D |"
    lines = ["## Frozen probe: Dice on the test cases", "", head, "|---" * (len(names) + 4) + "|"]
    for slug, r in report["probe"].items():
        per = " | ".join(_f(d) for d in r["dice_per_class"])
        draws = r.get("draws") or []
        label = subjects[slug]["label"] + (
            f", mean of {len(draws)} draws (each {_f(min(draws))} to {_f(max(draws))})" if len(draws) > 1 else ""
        )
        lines.append(f"| {label} | {_f(r['dice'])} | {per} | {r['tokens']} | {r['features']} |")
    note = (
        "tokens: the training cases' patch tokens the linear probe was fitted on (one per encoder patch, each labelled "
        "with its share of every class); D: the width of each token's features."
    )
    return lines + ["", note, ""]


def class_names(cases: dict[str, Any]) -> list[str]:
    """The names of classes 1..K in a report's ``cases`` ("class k" where unnamed, and in reports made before
    classes had names)."""
    return cases.get("class_names") or [f"class {k}" for k in range(1, cases["classes"])]


def _classes_text(cases: dict[str, Any]) -> str:
    """ "1 liver (label 5), 2 spleen (label 1)": each class, with its label value where that differs."""
    values = cases.get("label_values") or range(1, cases["classes"])
    return ClassMap(tuple(values), tuple(class_names(cases)), cases.get("chosen", False)).text()


def _measure(name: str, k: int) -> str:
    """cases.csv's name of class k's Dice: ``dice_liver``, or ``dice_1`` for an unnamed class."""
    return f"dice_{k}" if name == f"class {k}" else f"dice_{name}"


def _fewshot_table(report: dict[str, Any], subjects: dict[str, dict]) -> list[str]:
    if not report["fewshot"]:
        return []
    shots = report["settings"]["shots"]
    lines = [
        "## Few-shot fine-tuning: mean Dice on the test cases (mean ± sd over repeats)",
        "",
        "| encoder | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---" * (len(shots) + 1) + "|",
    ]
    for slug, by_k in report["fewshot"].items():
        cells = []
        for k in shots:
            e = by_k.get(str(k))
            cells.append("–" if e is None else f"{_f(e['mean'])} ± {_f(e['sd'])} (n={e['n']})")
        lines.append(f"| {subjects[slug]['label']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _recon_table(report: dict[str, Any], subjects: dict[str, dict]) -> list[str]:
    if not report["recon"]:
        return []
    lines = [
        "## Reconstruction: PSNR (dB) on hidden voxels of the test scans",
        "",
        "| checkpoint | mask | ratio | MAE | gaussian fill (best σ, voxels) | mean fill |",
        "|---|---|---|---|---|---|",
    ]
    for slug, r in report["recon"].items():
        for kind in ("block", "random"):
            k = r[kind]
            lines.append(
                f"| {subjects[slug]['label']} | {kind} | {r['ratio']:g} | {_f(k['mae'], 2)} | "
                f"{_f(k['gaussian'], 2)} (σ={k['gaussian_sigma']:g}) | {_f(k['mean'], 2)} |"
            )
    return lines + [""]


HOW_TO_READ = """## How to read this report

- **Frozen probe**: a linear classifier per 16³-voxel token on frozen features, fitted on the training pool and
  scored by Dice on the test cases. *intensity* uses only the statistics of each patch's own voxels: it is the floor.
  An encoder whose probe Dice is not above the floor has learned nothing a linear read-out can use beyond the
  intensity of a patch; *scratch* is a randomly initialised encoder of the same size (random features with context),
  its Dice the mean over several initialisations (their range beside it: one draw alone moves with its seed).
  The probe sees tokens, so structures much smaller than a patch score low for every encoder.
- **Few-shot**: fine-tuning with k labelled cases, the same subsets, seeds, crops and steps for the pretrained
  encoder and its scratch twin; the gap between the two rows at each k is what pretraining buys. With few test
  cases and repeats the ± is wide: compare gaps against it.
- **Reconstruction**: PSNR of the hidden voxels against two fills that know nothing of anatomy. Under *random*
  masks a hidden patch has visible neighbours and smooth interpolation (the gaussian fill) is hard to beat; under
  *block* masks it is not. An MAE that does not beat the gaussian fill under block masks has not learned to infer
  missing anatomy. The best σ is picked on the test scans themselves, so the fill's figure is optimistic.
- Files: report.json holds every figure (per case too), the settings and each checkpoint's SHA-256; cases.csv has
  one row per case and measure; report.png draws the three protocols; fewshot/ holds each fine-tuning run's logs.
"""


def case_rows(report: dict[str, Any]) -> str:
    """cases.csv: protocol, encoder, shots, repeat, case, measure, value (one row per case and measure)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "encoder", "shots", "repeat", "case", "measure", "value"])
    label = {s["slug"]: s["label"] for s in report["subjects"]}
    measures = [_measure(name, k) for k, name in enumerate(class_names(report["cases"]), 1)]
    for slug, r in report["probe"].items():
        for case, dice in r["per_case"].items():
            writer.writerows(["probe", label[slug], "", "", case, m, f"{d:.6f}"] for m, d in zip(measures, dice))
    for slug, by_k in report["fewshot"].items():
        for k, entry in by_k.items():
            for run in entry["runs"]:
                for case, dice in run["per_case"].items():
                    writer.writerows(
                        ["fewshot", label[slug], k, run["repeat"], case, m, f"{d:.6f}"] for m, d in zip(measures, dice)
                    )
    for slug, r in report["recon"].items():
        for case, kinds in r["per_case"].items():
            for kind, methods in kinds.items():
                writer.writerows(
                    ["recon", label[slug], "", "", case, f"psnr_{kind}_{m}", "" if v is None else f"{v:.4f}"]
                    for m, v in methods.items()
                )
    return buffer.getvalue()
