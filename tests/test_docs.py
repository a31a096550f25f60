"""The documents hold: the generated reference is current, links resolve, tests they name exist, the quickstart runs
as written on the sample data, and no document narrates the project's history."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")])
QUICKSTART = ROOT / "docs" / "quickstart.md"
PYTHON_API = ROOT / "docs" / "python-api.md"
QUICK_STEPS = "--steps 30"  # the quickstart's own shortcut for the demo ("add `--steps 30`")


def load_make_reference():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_comments(text: str) -> str:
    """Markdown with its HTML comments (places marked for later additions) removed."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the generated reference ---------------------------------------------------------------------------------------


def test_the_generated_reference_is_what_make_reference_writes_now():
    for path, text in load_make_reference().outputs().items():
        assert path.is_file(), f"{relative(path)} is missing: run python docs/make_reference.py"
        assert path.read_text(encoding="utf-8") == text, f"{relative(path)} is stale: run python docs/make_reference.py"


def test_the_cli_reference_covers_every_command_and_option():
    import typer.main

    from ctmae.cli import app

    reference = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## ctmae {name}\n" in reference, name
        section = reference.split(f"## ctmae {name}\n", 1)[1].split("\n## ", 1)[0]
        for option in (o for p in command.params for o in p.opts if o.startswith("--")):
            assert f"`{option}`" in section, (name, option)


def test_the_config_reference_names_every_key_with_its_comment():
    reference = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    for key, comment in [
        ("mask.predict_ratio", "share of all tokens the decoder predicts"),  # a comment above its field
        ("data.zoom", "resampled trilinearly to the crop"),  # a trailing comment's continuation line
        ("train.grad_clip", "max global gradient norm; 0 (MAE's recipe)"),
        ("net.num_classes", "output channels, background included"),
    ]:
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{key}` |"))
        assert comment in row, key


# --- links and names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_every_relative_link_points_to_a_file_that_exists(doc):
    text = without_comments(doc.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{relative(doc)}: links to missing files: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_every_test_a_document_names_exists(doc):
    missing = []
    for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc.read_text(encoding="utf-8")):
        source = ROOT / path
        if not source.is_file() or not re.search(rf"^def {name}\(", source.read_text(encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"{relative(doc)} names tests that do not exist: {missing}"


# --- what documents say --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_no_document_narrates_the_project_s_history(doc):
    text = doc.read_text(encoding="utf-8")
    found = re.findall(r"\bissues? #?\d+|(?<![\w/])#\d+\b|\bsessions?\b|\bwork periods?\b|\bpreviously\b", text, re.I)
    assert not found, f"{relative(doc)} mentions {sorted(set(found))}"


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; link to docs/ instead"


def test_every_benchmark_table_has_its_command_and_date():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if "\n|---" not in section:
            continue
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", section), f"BENCHMARKS.md, {title!r}: no date"
        assert re.search(r"`(python -m |bash |ctmae )", section), f"BENCHMARKS.md, {title!r}: no command"


# --- the quickstart, run as written --------------------------------------------------------------------------------


def run_text(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``argv`` and keep its output as text, decoded as UTF-8 whatever this process's locale says."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")


def quickstart_blocks() -> tuple[list[str], list[str]]:
    """The quickstart's bash blocks: (install blocks, blocks that use ctmae)."""
    blocks = fenced(QUICKSTART.read_text(encoding="utf-8"), "bash")
    install = [b for b in blocks if b.startswith("python3 -m venv")]
    return install, [b for b in blocks if b not in install]


def test_the_quickstart_installs_as_the_readme_does_and_every_other_block_is_run():
    install, run = quickstart_blocks()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(install) == 1 and install[0].strip() in readme, "the quickstart's install differs from README's"
    assert all(line.startswith(("ctmae ", "    ")) for block in run for line in block.splitlines()), run
    assert f"add `{QUICK_STEPS}`" in QUICKSTART.read_text(encoding="utf-8")
    assert sum("ctmae pretrain --out runs/demo\n" == block for block in run) == 1


@pytest.mark.slow
def test_the_quickstart_runs_as_written_on_the_sample_data(tmp_path):
    """Every command of the quickstart, in order, in a copy of the sample data, with the demo shortened the way the
    quickstart itself says (``--steps 30``); then its Python block."""
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ctmae"  # this checkout's ctmae, whatever is installed
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ctmae "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "COLUMNS": "200",
    }
    _, blocks = quickstart_blocks()
    for block in blocks:
        command = block.replace("ctmae pretrain --out runs/demo\n", f"ctmae pretrain --out runs/demo {QUICK_STEPS}\n")
        result = run_text(["bash", "-euo", "pipefail", "-c", command], tmp_path, env)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    for python in fenced(QUICKSTART.read_text(encoding="utf-8"), "python"):
        result = run_text([sys.executable, "-c", python], tmp_path, env)
        assert result.returncode == 0, f"{python}\n{result.stderr[-2000:]}"

    runs = tmp_path / "runs"
    assert (runs / "demo" / "checkpoints" / "last.pt").is_file() and (runs / "demo" / "config.yaml").is_file()
    metrics = json.loads((runs / "demo_recon" / "metrics.json").read_text(encoding="utf-8"))
    assert np.isfinite(metrics["fill"]["masked_minus_fill_db"])
    assert metrics["shift"]["shift_score"] is not None
    for name in ("input", "masked", "reconstruction", "error", "mask"):
        assert (runs / "demo_recon" / f"{name}.nii.gz").is_file()
    with np.load(runs / "embeddings.npz") as table:
        assert len(table["ids"]) == 2  # the NIfTI and the DICOM series of lung1
    assert len(list((runs / "tokens").glob("*.npy"))) == 2
    assert {p.name for p in (runs / "encoder").iterdir()} >= {"encoder.safetensors", "config.json", "README.md"}


@pytest.mark.slow  # tiny settings, but a pretraining, a fine-tuning and three inference passes on real scans
def test_the_python_api_walk_through_runs_as_written(tmp_path):
    """docs/python-api.md's Python blocks, in order, in one process, from a link to of the repository's sample data:
    each call writes what the guide says it writes."""
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    session = "\n".join(fenced(PYTHON_API.read_text(encoding="utf-8"), "python"))
    result = run_text([sys.executable, "-c", session], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    assert "resumed at step 3 and ran to step 5" in result.stdout
    assert "step 5: loss" in result.stdout  # the reporter heard the steps
    assert (runs / "api" / "checkpoints" / "last.pt").is_file() and (runs / "api" / "inputs.csv").is_file()
    assert (runs / "api_seg" / "checkpoints" / "best.pt").is_file()
    assert list((runs / "api_labels").glob("*.nii.gz")) and (runs / "api_recon" / "metrics.json").is_file()
    with np.load(runs / "api_embeddings.npz") as table:
        assert len(table["ids"]) == 2
    assert "torch.Size([1, 8, 96])" in result.stdout
