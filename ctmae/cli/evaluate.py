"""``ctmae evaluate``: frozen probes, few-shot fine-tuning against scratch, and reconstruction against trivial fills,
for one or more MAE checkpoints on a labelled dataset, into one report folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ctmae.api.classes import check_classes_spec, resolve_classes
from ctmae.cli.classes import ClassesOption, LabelNamesOption
from ctmae.cli.common import (
    UsageError,
    app,
    console,
    errors,
    progress_bar,
    run_command,
    use_resources,
    warn,
)
from ctmae.cli.options import Device, Threads

PathList = Optional[list[Path]]
REPORT_OUTPUTS = ("report.json", "report.md", "report.png", "cases.csv", "journal.jsonl", "fewshot")


def _numbers(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated whole numbers, got {text!r}") from None


def prepare_report_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty REPORT_DIR unless resuming or overwriting; --overwrite removes only evaluate's outputs."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out must be a folder, but a file is there")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise UsageError(f"{out}: folder is not empty; pass --resume to continue that evaluation or --overwrite")
    if overwrite and not resume and out.is_dir():
        for name in REPORT_OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot write there ({e.strerror})") from None


@app.command()
def evaluate(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="MAE pretraining checkpoints to compare (a from-scratch baseline is added).")
    ],
    images: Annotated[
        PathList,
        typer.Option(
            help="Labelled images: files/folders (paired with --labels by file name), or one .csv/.json datalist "
            "(image,label), or one nnU-Net folder with imagesTr/ and labelsTr/."
        ),
    ] = None,
    labels: Annotated[PathList, typer.Option(help="Label volumes (NIfTI/NRRD/MHA), named as their images.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder.")] = None,
    protocols: Annotated[str, typer.Option(help="Comma-separated: probe,fewshot,recon")] = "probe,fewshot,recon",
    shots: Annotated[str, typer.Option(help="Labelled training cases per few-shot run, comma-separated")] = "1,2",
    repeats: Annotated[int, typer.Option(help="Few-shot runs per number of shots (seeds and subsets)")] = 2,
    seed: Annotated[int, typer.Option(help="Picks the test cases and few-shot subsets; seeds probe and masks")] = 0,
    test_cases: Annotated[
        Optional[int], typer.Option(help="Held-out test cases (default: a fifth, leaving max(shots) to train)")
    ] = None,
    steps: Annotated[int, typer.Option(help="Fine-tuning steps per few-shot run")] = 500,
    lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning crops per step")] = 2,
    crop: Annotated[
        Optional[int], typer.Option(help="Fine-tuning crop, a multiple of 16 (default: the checkpoint's)")
    ] = None,
    feature_size: Annotated[int, typer.Option(help="UNETR convolutional feature width")] = 16,
    windows: Annotated[int, typer.Option(help="Crops per test scan for the recon protocol")] = 4,
    classes: ClassesOption = None,
    label_names: LabelNamesOption = None,
    device: Device = "auto",
    threads: Threads = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted evaluation in REPORT_DIR.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace evaluate's outputs in a non-empty REPORT_DIR.")
    ] = False,
) -> None:
    """Measure what pretraining buys: frozen probes, few-shot fine-tuning vs scratch, reconstruction vs fills."""

    def body() -> None:
        from ctmae.experiments.evaluate import ResumeMismatch, check_cases, load_subjects, split_cases
        from ctmae.seg.data import find_cases

        if out is None:
            raise UsageError("--out REPORT_DIR is required")
        if not images:
            raise UsageError("--images is required (with --labels, or one datalist / nnU-Net folder)")
        use_resources(threads, device, 0)
        given = dict(repeats=repeats, seed=seed, test_cases=test_cases, steps=steps, lr=lr, batch_size=batch_size)
        given |= dict(crop=crop, feature_size=feature_size, recon_windows=windows, device=device)
        settings = _settings(protocols, shots, classes, given)
        check_classes_spec(classes)
        cases = find_cases([str(p) for p in images], [str(p) for p in labels or []])
        try:
            test, pool = split_cases(cases, settings.test_cases, settings.max_shots, settings.seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
        chosen, names = resolve_classes(cases, classes, label_names)
        subjects = load_subjects(checkpoints, settings)
        prepare_report_dir(out, resume, overwrite)
        for s in subjects:
            if s.kind == "pretrained" and s.fewshot_problem:
                warn(s.fewshot_problem)
        with progress_bar() as progress:
            task = progress.add_task("checking labels", total=len(cases), info="")
            checked = check_cases(test, pool, lambda: progress.advance(task), chosen, names)
        console.print(
            f"{len(cases)} labelled case(s): {len(test)} test, {len(pool)} training; classes "
            f"{checked.class_map.text()}; comparing {', '.join(s.label for s in subjects)}",
            highlight=False,
            soft_wrap=True,
        )
        try:
            result = _run(settings, subjects, checked, out, resume)
        except ResumeMismatch as e:
            raise UsageError(str(e)) from None
        _summary(result, out)
        _finish(result)

    run_command(body)


def _settings(protocols: str, shots: str, classes: Optional[str], given: dict[str, Any]):
    """The evaluation's settings from the options (UsageError for values it cannot take)."""
    from ctmae.experiments.evaluate import EvalSettings

    try:
        return EvalSettings(
            protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()),
            shots=_numbers(shots, "--shots"),
            classes=classes or "",
            **given,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run(settings, subjects, checked, out: Path, resume: bool) -> dict[str, Any]:
    from ctmae.experiments.evaluate import Progress, run_evaluation

    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=None, info="")
        callbacks = Progress(
            start=lambda total, done: progress.update(task, total=total, completed=done),
            unit=lambda text: progress.update(task, info=text),
            tick=lambda n: progress.advance(task, n),
        )
        return run_evaluation(settings, subjects, checked, out, resume, callbacks)


def _summary(report: dict[str, Any], out: Path) -> None:
    """One row per encoder: probe Dice, few-shot Dice per k, recon PSNR of the MAE and the gaussian fill."""
    protocols, shots = report["settings"]["protocols"], report["settings"]["shots"]
    columns = {"encoder": lambda s: s["label"]}
    if "probe" in protocols:
        columns["probe Dice"] = lambda s: _cell(report["probe"].get(s["slug"]), "dice")
    for k in shots if "fewshot" in protocols else ():
        columns[f"k={k} Dice"] = lambda s, k=k: _cell(report["fewshot"].get(s["slug"], {}).get(str(k)), "mean", "sd")
    if "recon" in protocols:
        columns["block PSNR: MAE | fill"] = lambda s: _recon_cell(report["recon"].get(s["slug"]))
    table = Table(title="evaluation summary (full tables in report.md)")
    for name in columns:
        table.add_column(name)
    for s in report["subjects"]:
        table.add_row(*(cell(s) for cell in columns.values()))
    console.print(table)
    done = "" if report["complete"] else f" ({report['units_done']} of {report['units_total']} units)"
    console.print(f"report{done}: {out / 'report.md'}, report.json, report.png, cases.csv", highlight=False)


def _cell(figures: dict | None, key: str, spread: str = "") -> str:
    if figures is None:
        return ""
    sd = figures.get(spread) if spread else None
    return f"{figures[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _recon_cell(recon: dict | None) -> str:
    return "" if recon is None else f"{_db(recon['block']['mae'])} | {_db(recon['block']['gaussian'])}"


def _db(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _finish(result: dict[str, Any]) -> None:
    """Exit code: 130 after Ctrl-C, 0 after a stop signal (--resume continues), 1 if a protocol was skipped."""
    if result["stopped"]:
        errors.print(
            f"[yellow]stopped early:[/yellow] {escape(result['stopped'])}; finished units are kept, --resume continues",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130 if result["interrupted"] else 0)
    for problem in result["problems"]:
        errors.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if result["problems"]:
        raise typer.Exit(1)
