"""What can be checked of the Docker image without a Docker engine: lint, structure, and the install it does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure():
    assert re.search(r"^FROM pytorch/pytorch:\S+cuda\S+", DOCKERFILE, re.M)  # CUDA-enabled PyTorch base
    assert 'ENTRYPOINT ["ctmae"]' in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    for src in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert "/runs" in DOCKERFILE and "/data" in DOCKERFILE


@pytest.mark.slow
def test_the_dockerfile_install_gives_a_working_entrypoint(tmp_path):
    """`pip install .` as in the image (a real wheel, not editable), then the ENTRYPOINT runs the demo's first step."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            *map(str, wheel_dir.glob("ctmae-*.whl")),
        ],
        check=True,
        capture_output=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
        "CTMAE_SAMPLE_DATA": str(ROOT / "sample_data"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    entry = [
        sys.executable,
        "-c",
        "import ctmae, sys; assert 'site' in ctmae.__file__, ctmae.__file__; "
        "from ctmae.cli import main; sys.argv[0] = 'ctmae'; main()",
    ]
    help_ = subprocess.run([*entry, "--help"], env=env, capture_output=True, encoding="utf-8", cwd=tmp_path)
    assert help_.returncode == 0 and "pretrain" in help_.stdout
    demo = subprocess.run(
        [*entry, "pretrain", "--out", str(tmp_path / "runs" / "exp1"), "--steps", "1", "--workers", "0"],
        env=env,
        capture_output=True,
        encoding="utf-8",
        cwd=tmp_path,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "runs" / "exp1" / "checkpoints" / "last.pt").is_file()
    assert list((tmp_path / "cache" / "ctmae").glob("*.b2nd"))  # XDG_CACHE_HOME, as the image sets it


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "slurm").glob("pretrain*.sbatch")), ids=lambda p: p.name)
def test_slurm_scripts_resume_and_forward_the_warning_signal(script):
    text = script.read_text(encoding="utf-8")
    assert "--signal=B:USR1@" in text and "--requeue" in text and "trap on_warning USR1" in text
    assert "torchrun" in text and "-m ctmae pretrain" in text and "--resume" in text
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
