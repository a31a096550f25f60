"""``ctmae study``: pretrain one MAE per point of a grid of settings (mask kind, ratio, block, decoder...) on the same
scans, evaluate each on the same labelled cases, and gather one table, ranking and chart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ctmae.api.classes import check_classes_spec, resolve_classes
from ctmae.cli.classes import ClassesOption, LabelNamesOption
from ctmae.cli.common import (
    UsageError,
    app,
    console,
    errors,
    progress_bar,
    report_skipped,
    run_command,
    use_resources,
)
from ctmae.cli.evaluate import _numbers
from ctmae.cli.options import Device, Threads, Workers
from ctmae.mae.config import MODEL_PRESETS

PathList = Optional[list[Path]]


@app.command()
def study(
    scans: Annotated[PathList, typer.Argument(help="Training scans: files or folders (as for pretrain).")] = None,
    eval_images: Annotated[
        PathList,
        typer.Option(help="Labelled images for evaluation (with --eval-labels, or a datalist / nnU-Net folder)."),
    ] = None,
    eval_labels: Annotated[PathList, typer.Option(help="Labels of --eval-images, paired by file name.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Study folder.")] = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            help="KEY=V1,V2,... (repeatable): mask, mask_ratio, block, dec_depth, predict_ratio, or any section.key"
        ),
    ] = None,
    grid_file: Annotated[Optional[Path], typer.Option(help="YAML mapping of grid keys to lists of values.")] = None,
    config: Annotated[
        Optional[Path], typer.Option(help="Base pretraining config YAML (as a run's config.yaml).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Pretraining steps per point")] = 1000,
    model: Annotated[str, typer.Option(help=f"Size preset: {'|'.join(MODEL_PRESETS)}")] = "base",
    crop: Annotated[Optional[int], typer.Option(help="Crop edge in voxels (default: the config's, 96)")] = None,
    patch: Annotated[Optional[int], typer.Option(help="Patch edge in voxels (default: the config's, 16)")] = None,
    seed: Annotated[int, typer.Option(help="One seed for every point's pretraining and the evaluation")] = 0,
    batch_size: Annotated[Optional[int], typer.Option(help="Pretraining crops per step (default: 2)")] = None,
    device: Device = "auto",
    workers: Workers = None,
    threads: Threads = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Preprocessing cache (default: ~/.cache/ctmae)")] = None,
    protocols: Annotated[str, typer.Option(help="Evaluation protocols: probe,fewshot,recon")] = "probe,fewshot,recon",
    shots: Annotated[str, typer.Option(help="Few-shot labelled cases, comma-separated")] = "1,2",
    repeats: Annotated[int, typer.Option(help="Few-shot runs per number of shots")] = 2,
    test_cases: Annotated[Optional[int], typer.Option(help="Held-out test cases (default: a fifth)")] = None,
    ft_steps: Annotated[int, typer.Option(help="Fine-tuning steps per few-shot run")] = 500,
    windows: Annotated[int, typer.Option(help="Crops per test scan for the recon protocol")] = 4,
    classes: ClassesOption = None,
    label_names: LabelNamesOption = None,
    point: Annotated[Optional[int], typer.Option(help="Run only point I (0-based; a SLURM array index).")] = None,
    report: Annotated[
        bool, typer.Option("--report", help="Only gather the finished points of --out into the report.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Run a grid of more than 12 points.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a study folder made with other data or settings.")
    ] = False,
) -> None:
    """Which corruption suits your scans: pretrain and evaluate every point of a grid, then compare them."""

    def body() -> None:
        from ctmae.experiments import study as st

        if out is None:
            raise UsageError("--out STUDY_DIR is required")
        if report and not scans:
            _report_only(out)
            return
        if not scans:
            raise UsageError("SCANS are required (or --report --out STUDY_DIR to gather a study)")
        if not eval_images:
            raise UsageError("--eval-images is required (with --eval-labels, or one datalist / nnU-Net folder)")
        check_classes_spec(classes)
        settings = _settings(protocols, shots, repeats, seed, test_cases, ft_steps, windows, device, classes)
        base = _base(config, model, crop, patch, steps, seed, device, workers, cache_dir, batch_size)
        visit_bytes = base.data.crops_per_volume * base.preprocess.crop**3 * 4
        base = base.replace(data={"workers": use_resources(threads, device, base.data.workers, visit_bytes).workers})
        try:
            if bool(grid) == bool(grid_file):
                raise st.GridError("give the grid as --grid KEY=V1,V2 (repeatable) or as --grid-file, one of them")
            values = st.parse_grid(grid) if grid else st.load_grid_file(grid_file)
            points = st.plan_points(values, base)
        except st.GridError as e:
            raise UsageError(str(e)) from None
        chosen = _choose(points, point, yes)
        wanted = st.manifest(scans, [*eval_images, *(eval_labels or [])], values, base, settings)
        try:
            st.open_study(out, wanted, overwrite)
        except st.StudyMismatch as e:
            raise UsageError(str(e)) from None
        cases = _eval_cases(eval_images, eval_labels, settings, label_names)
        sources_for = _sources(scans)
        console.print(f"study of {len(points)} point(s) in {out}; running {len(chosen)}", highlight=False)
        result = _run(chosen, out, sources_for, settings, cases)
        gathered = st.gather(out, points, wanted)
        _finish(result, gathered, out)

    run_command(body)


def _settings(protocols, shots, repeats, seed, test_cases, ft_steps, windows, device, classes):
    from ctmae.experiments.evaluate import EvalSettings

    try:
        return EvalSettings(
            protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()),
            shots=_numbers(shots, "--shots"),
            repeats=repeats,
            seed=seed,
            test_cases=test_cases,
            steps=ft_steps,
            recon_windows=windows,
            device=device,
            classes=classes or "",
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _base(config, model, crop, patch, steps, seed, device, workers, cache_dir, batch_size):
    """The config every point starts from: --config, then the study's options."""
    from ctmae.mae.config import RunConfig

    try:
        cfg = RunConfig.load_yaml(config) if config else RunConfig()
        pre = {"crop": crop, "cache_dir": str(cache_dir) if cache_dir else None}
        return cfg.replace(
            model={k: v for k, v in {"size": model, "patch": patch}.items() if v is not None},
            preprocess={k: v for k, v in pre.items() if v is not None},
            data={"workers": workers} if workers is not None else {},
            train={"steps": steps, "epochs": None, "seed": seed, "device": device}
            | ({"batch_size": batch_size} if batch_size else {}),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _choose(points: list, index: Optional[int], yes: bool) -> list:
    from ctmae.experiments.study import MAX_POINTS

    if index is not None:
        if not 0 <= index < len(points):
            raise UsageError(f"--point {index}: the grid has {len(points)} point(s), numbered 0 to {len(points) - 1}")
        return [points[index]]
    if len(points) > MAX_POINTS and not yes:
        raise UsageError(
            f"the grid has {len(points)} points (more than {MAX_POINTS}), each a full pretraining run: pass --yes to "
            "run them all, or --point I to run one"
        )
    return points


def _eval_cases(images: list[Path], labels: PathList, settings, names_file: Optional[Path]):
    from ctmae.experiments.evaluate import check_cases, split_cases
    from ctmae.seg.data import find_cases

    cases = find_cases([str(p) for p in images], [str(p) for p in labels or []])
    try:
        test, pool = split_cases(cases, settings.test_cases, settings.max_shots, settings.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    chosen, names = resolve_classes(cases, settings.classes or None, names_file)
    checked = check_cases(test, pool, classes=chosen, names=names)
    console.print(f"evaluation classes: {checked.class_map.text()}", highlight=False, soft_wrap=True)
    return checked


def _sources(scans: list[Path]):
    """The training volumes, found once and cached once per distinct preprocessing (points share the cache)."""
    from ctmae.io.checks import InputError
    from ctmae.io.discovery import find_volumes
    from ctmae.preprocess.build_cache import build_cache

    found, problems = find_volumes([str(p) for p in scans])
    report_skipped(problems)
    if not found:
        raise InputError(f"no usable volume among the inputs ({len(problems)} skipped)")
    ready: dict[str, list] = {}

    def sources_for(point) -> list:
        key = repr(point.cfg.preprocess)
        if key not in ready:
            pre, workers = point.cfg.preprocess, point.cfg.data.workers or 0
            good, bad = build_cache(found, pre, min_edge=point.cfg.model.patch, workers=workers)
            report_skipped(bad)
            if not good:
                raise InputError(f"no usable volume among the inputs ({len(bad)} skipped)")
            ready[key] = good
        return ready[key]

    return sources_for


def _run(points: list, out: Path, sources_for, settings, cases) -> dict[str, Any]:
    from ctmae.experiments.evaluate import Progress
    from ctmae.experiments.study import StudyHooks, run_study

    with progress_bar() as progress:
        task = progress.add_task("study", total=None, info="")

        def said(p, what: str) -> None:
            if what == "start":
                progress.update(task, description=f"point {p.folder}: pretraining", completed=0, total=None, info="")
            elif what != "start":
                progress.console.print(f"point {p.folder}: {what}", highlight=False)

        def stepped(info: dict) -> None:
            if info["loss"] is not None:
                progress.update(task, info=f"loss {info['loss']:.4f}")
            progress.update(task, completed=info["step"])

        def evaluating(total: int, done: int) -> None:
            progress.update(task, description="  evaluating", total=total, completed=done, info="")

        hooks = StudyHooks(
            point=said,
            pretrain={
                "on_start": lambda info: progress.update(task, total=info["total_steps"], completed=info["start_step"]),
                "on_step": stepped,
            },
            evaluate=Progress(
                start=evaluating,
                unit=lambda text: progress.update(task, info=text),
                tick=lambda n: progress.advance(task, n),
            ),
        )
        return run_study(points, out, sources_for, settings, cases, hooks)


def _report_only(out: Path) -> None:
    from ctmae.experiments.study import StudyMismatch, gather, plan_points
    from ctmae.experiments.study.plan import read_manifest
    from ctmae.mae.config import RunConfig

    try:
        man = read_manifest(out)
    except StudyMismatch as e:
        raise UsageError(str(e)) from None
    if man is None:
        raise UsageError(f"{out}: no study.json there; run a study into it first")
    points = plan_points(man["grid"], RunConfig.from_dict(man["base"]))
    gathered = gather(out, points, man)
    _finish({"stopped": None, "failed": []}, gathered, out)


def _finish(result: dict[str, Any], gathered: dict[str, Any], out: Path) -> None:
    """Print the summary; exit 130 after Ctrl-C, 0 after a stop signal (a re-run resumes), 1 if a point failed."""
    total = len(gathered["points"])
    console.print(
        f"{gathered['done']} of {total} point(s) done, {gathered['failed']} failed: {out / 'study.md'}, study.json, "
        "study.png",
        highlight=False,
    )
    console.print(gathered["ranking"]["line"], highlight=False, soft_wrap=True)
    for r in gathered["points"]:
        if r["status"] == "failed":
            errors.print(
                f"[red]point {r['folder']} failed:[/red] {escape(r['reason'])}", highlight=False, soft_wrap=True
            )
        if r["decoder_flag"]:
            errors.print(f"[yellow]point {r['folder']}:[/yellow] decoder may be doing the work", highlight=False)
    if result["stopped"]:
        errors.print(
            f"[yellow]stopped early:[/yellow] {escape(result['stopped'])}; finished points are kept, run the same "
            "command again to continue",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130 if result.get("interrupted") else 0)
    if gathered["failed"]:
        raise typer.Exit(1)
