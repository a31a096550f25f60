"""Run a study's points: per point, pretrain into ``points/NNN-name/run``, evaluate its ``last.pt`` into
``points/NNN-name/eval`` on the same test cases with the same settings, and record ``status.json``.

A finished point is skipped on a re-run; a failed one is tried again (its cause may be fixed); an unfinished one
continues (pretraining resumes from its last.pt, the
evaluation from its journal). A point that raises is recorded as failed with its one-line reason and the study goes
on. A stop signal (SIGTERM/SIGUSR1, a first Ctrl-C) ends the study after the running step or case, leaving that
point unfinished and resumable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmae.experiments.evaluate import EvalCases, EvalSettings, Progress, load_subjects, run_evaluation
from ctmae.experiments.evaluate.report import class_names
from ctmae.experiments.study.plan import Point
from ctmae.io.discovery import VolumeSource
from ctmae.mae.context import context_problem
from ctmae.runtime.files import atomic_write_text
from ctmae.runtime.signals import StopFlag, Stopped

STATUS = "status.json"


@dataclass
class StudyHooks:
    """Callbacks of a running study (all optional): a point begins / ends, and progress inside it."""

    point: Callable[[Point, str], None] | None = None  # (point, "start" | "skip" | "done" | "failed")
    pretrain: dict[str, Callable[[dict[str, Any]], None]] | None = None  # on_start / on_step for pretrain
    evaluate: Progress | None = None


def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.folder


def read_status(out: Path, point: Point) -> dict[str, Any] | None:
    """The point's status.json, or None when it has not finished (or never started)."""
    path = point_dir(out, point) / STATUS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_study(
    points: Sequence[Point],
    out: Path,
    sources_for: Callable[[Point], list[VolumeSource]],
    settings: EvalSettings,
    cases: EvalCases,
    hooks: StudyHooks | None = None,
) -> dict[str, Any]:
    """Run every point not yet finished.

    Args:
        points: the points to run (all of them, or the one ``--point`` names).
        sources_for: the cached training volumes for a point's data settings.

    Returns:
        ``{"ran", "skipped", "failed"}`` (point indices), ``stopped`` (None or the signal's name), ``interrupted``.
    """
    hooks = hooks or StudyHooks()
    done: dict[str, list[int]] = {"ran": [], "skipped": [], "failed": []}
    stopped = None
    with StopFlag() as flag:  # a signal between a point's stages stops the study there
        for point in points:
            status = read_status(out, point)
            if status is not None and status["status"] == "done":
                done["skipped"].append(point.index)
                _say(hooks, point, "skip")
                continue
            if flag.signal:
                stopped = flag.signal
                break
            _say(hooks, point, "start")
            try:
                stopped = _run_point(point, out, sources_for, settings, cases, hooks, flag)
            except Stopped as e:  # a stop between windows or cases that no stage caught: the point stays unfinished
                stopped = e.signal
            except Exception as e:  # noqa: BLE001  (a failed point is recorded; the study goes on)
                _record(out, point, {"status": "failed", "reason": _one_line(e)})
                done["failed"].append(point.index)
                _say(hooks, point, "failed")
                continue
            if stopped:
                break
            done["ran"].append(point.index)
            _say(hooks, point, "done")
        stopped = stopped or flag.signal
    return {**done, "stopped": stopped, "interrupted": stopped == "SIGINT"}


def _run_point(
    point: Point,
    out: Path,
    sources_for: Callable[[Point], list[VolumeSource]],
    settings: EvalSettings,
    cases: EvalCases,
    hooks: StudyHooks,
    flag: StopFlag,
) -> str | None:
    """Pretrain and evaluate one point; returns the stop signal's name when one ended it early (status unwritten)."""
    from ctmae.mae.train import pretrain

    problem = context_problem(point.cfg)
    if problem:
        raise ValueError(problem)
    folder = point_dir(out, point)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    callbacks = hooks.pretrain or {}
    sources = sources_for(point)
    if flag.signal:  # arrived while caching: pretraining has its own handler and would not see it
        return flag.signal
    result = pretrain(
        point.cfg,
        sources,
        folder / "run",
        resume=True,
        on_start=callbacks.get("on_start"),
        on_step=callbacks.get("on_step"),
    )
    if result["stopped"]:
        if "signal" in result["stopped"] or result["interrupted"]:
            return "SIGINT" if result["interrupted"] else result["stopped"]
        raise RuntimeError(f"pretraining stopped early: {result['stopped']}")
    if flag.signal:
        return flag.signal
    last = Path(result["checkpoint"])
    subjects = load_subjects([last], settings)
    report = run_evaluation(settings, subjects, cases, folder / "eval", resume=True, progress=hooks.evaluate)
    if report["stopped"]:
        return report["stopped"]
    figures = {"final_loss": result["last_loss"], "pretrain_steps": result["steps"], **point_figures(report)}
    _record(out, point, {"status": "done", "seconds": round(time.monotonic() - started, 1), "figures": figures})
    return None


def point_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a study row shows, from one point's evaluation report (its checkpoint is ``ckpt0``)."""
    probe, recon = report["probe"], report["recon"]
    floor = next((r["dice"] for slug, r in probe.items() if slug.startswith("intensity")), None)
    scratch = next((r["dice"] for slug, r in probe.items() if slug.startswith("scratch")), None)
    figures: dict[str, Any] = {
        "classes": class_names(report["cases"]),
        "probe_dice": probe["ckpt0"]["dice"] if "ckpt0" in probe else None,
        "probe_dice_per_class": probe["ckpt0"]["dice_per_class"] if "ckpt0" in probe else None,
        "probe_floor": floor,
        "probe_scratch": scratch,
    }
    if "ckpt0" in recon:
        block = recon["ckpt0"]["block"]
        fills = [v for v in (block["gaussian"], block["mean"]) if v is not None]
        figures["masked_psnr"] = block["mae"]
        figures["fill_psnr"] = max(fills) if fills else None
        ok = block["mae"] is not None and fills
        figures["psnr_gain"] = block["mae"] - max(fills) if ok else None
    fewshot = report["fewshot"].get("ckpt0", {})
    figures["fewshot_dice"] = {k: e["mean"] for k, e in fewshot.items()}
    return figures


def _record(out: Path, point: Point, status: dict[str, Any]) -> None:
    body = {**point.describe(), **status}
    point_dir(out, point).mkdir(parents=True, exist_ok=True)
    atomic_write_text(point_dir(out, point) / STATUS, json.dumps(body, indent=2) + "\n")


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _say(hooks: StudyHooks, point: Point, what: str) -> None:
    if hooks.point:
        hooks.point(point, what)
