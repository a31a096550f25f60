"""The CPU budget (cgroup v1/v2 quotas, SLURM, --threads), OpenMP's wait policy, and how loader workers are planned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_body_scans
from ctmae.cli import app
from ctmae.runtime import openmp
from ctmae.runtime.cpu import cgroup_quota, cpu_budget, split_budget
from ctmae.runtime.loader import plan_workers, shm_free

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}
HOST = os.cpu_count()


def cgroup_files(root: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup under ``root`` holding ``files`` (relative path -> text) and a /proc/self/cgroup."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(proc_line + "\n", encoding="utf-8")
    return root, proc


@pytest.mark.parametrize(
    "proc_line, files, quota",
    [
        ("0::/", {"cpu.max": "max 100000"}, None),  # v2, no limit
        ("0::/", {"cpu.max": "150000 100000"}, 1.5),  # v2 in a container: its cgroup is the root
        ("0::/job/step", {"job/step/cpu.max": "max 100000", "job/cpu.max": "100000 100000"}, 1.0),  # parent caps
        ("0::/job/step", {"job/step/cpu.max": "300000 100000", "job/cpu.max": "800000 100000"}, 3.0),
        (
            "4:cpu,cpuacct:/slurm/job7",
            {"cpu,cpuacct/slurm/job7/cpu.cfs_quota_us": "50000", "cpu,cpuacct/slurm/job7/cpu.cfs_period_us": "100000"},
            0.5,
        ),  # v1
        (
            "4:cpu,cpuacct:/docker/abc",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
        ),  # v1, no limit
        ("4:cpu,cpuacct:/docker/abc", {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
        ("0::/", {"cpu.max": "garbage"}, None),  # unreadable: no quota, not a crash
    ],
)
def test_cgroup_quota_is_read_from_v1_and_v2_files(tmp_path, proc_line, files, quota):
    root, proc = cgroup_files(tmp_path / "cgroup", proc_line, files)
    assert cgroup_quota(root, proc) == quota


def budget(tmp_path: Path, env: dict[str, str], threads: int | None = None, cpu_max: str = "max 100000"):
    root, proc = cgroup_files(tmp_path / "cgroup", "0::/", {"cpu.max": cpu_max})
    return cpu_budget(threads, env, root, proc)


def test_a_quota_below_the_cores_sets_the_budget_and_rounds_down(tmp_path):
    b = budget(tmp_path, {}, cpu_max="150000 100000")
    assert (b.cores, b.limit) == (1, "cgroup quota")
    assert b.describe() == f"cpu budget: 1 of {HOST} cores (cgroup quota)"


@pytest.mark.parametrize(
    "env, threads, cores, limit",
    [
        ({"SLURM_CPUS_PER_TASK": "1"}, None, 1, "SLURM_CPUS_PER_TASK"),
        ({"CTMAE_THREADS": "1"}, None, 1, "CTMAE_THREADS"),
        ({}, 1, 1, "--threads"),
        ({"OMP_NUM_THREADS": "1"}, None, 1, "OMP_NUM_THREADS"),
        ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}, None, 1, "OMP_NUM_THREADS"),
        ({"SLURM_CPUS_PER_TASK": "bogus"}, None, len(os.sched_getaffinity(0)), None),  # SLURM's, not ours: ignored
    ],
)
def test_slurm_threads_and_environment_cap_the_budget(tmp_path, env, threads, cores, limit):
    b = budget(tmp_path, env, threads)
    assert b.cores == cores
    if limit:
        assert b.limit == limit


def test_torchrun_ranks_share_the_budget_and_its_omp_default_is_not_a_cap(tmp_path):
    """torchrun sets OMP_NUM_THREADS=1 for every rank on its own; the node's budget is split between the ranks."""
    b = budget(tmp_path, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "64"}, None)
    assert b.ranks == 2 and b.cores == max(1, len(os.sched_getaffinity(0)) // 2)
    assert "shared by 2 processes" in b.describe()
    assert budget(tmp_path, {"LOCAL_WORLD_SIZE": "2"}, threads=1).cores == 1  # --threads is per process


@pytest.mark.parametrize("env, threads", [({"CTMAE_THREADS": "0"}, None), ({"CTMAE_THREADS": "two"}, None), ({}, 0)])
def test_a_bad_thread_count_is_a_value_error_naming_it(tmp_path, env, threads):
    with pytest.raises(ValueError, match="CTMAE_THREADS|--threads"):
        budget(tmp_path, env, threads)


@pytest.mark.parametrize(
    "cores, device, workers, expected",
    [
        (2, "cpu", None, (2, 0)),
        (8, "cpu", None, (6, 2)),
        (64, "cpu", None, (56, 8)),
        (16, "cuda", None, (8, 8)),
        (1, "cuda", None, (1, 0)),
        (2, "cpu", 3, (1, 3)),
        (8, "cpu", 0, (8, 0)),
    ],
)
def test_the_budget_splits_into_torch_threads_and_loader_workers(cores, device, workers, expected):
    from ctmae.runtime.cpu import CpuBudget

    assert split_budget(CpuBudget(cores, 64, "cgroup quota"), device, workers) == expected


def test_workers_are_cut_to_what_shared_memory_holds(tmp_path):
    free = shm_free(tmp_path)
    assert plan_workers(4, 1024, tmp_path) == (4, None)  # a KiB per item: all fit
    workers, note = plan_workers(4, free // 10, tmp_path)  # 7.5 items fit: 2 workers x 2 prefetched + 2 in use
    assert workers == 2 and "2 worker(s) instead" in note and "--shm-size" in note
    workers, note = plan_workers(2, free, tmp_path)
    assert workers == 0 and "loading in the training process" in note
    assert plan_workers(0, free, tmp_path) == (0, None)


def test_threads_option_sets_torch_threads_and_is_on_the_start_line(tmp_path):
    scans = write_body_scans(tmp_path / "scans", 1)
    args = ["--model", "tiny", "--crop", "32", "--patch", "8", "--batch-size", "1", "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(scans),
            "--out",
            str(tmp_path / "run"),
            *args,
            "--threads",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"cpu budget: 1 of {HOST} cores (--threads); 1 torch thread(s), 0 loader worker(s)" in result.output
    assert torch.get_num_threads() == 1
    bad = CliRunner().invoke(app, ["pretrain", str(scans), "--out", str(tmp_path / "r2"), *args, "--threads", "0"])
    assert bad.exit_code == 2 and "--threads must be >= 1, got 0" in bad.output


@pytest.mark.parametrize("command", ["embed", "evaluate"])
def test_other_commands_print_the_cpu_budget(tmp_path, tiny_checkpoint, command):
    scans = write_body_scans(tmp_path / "scans", 1)
    scan = next(scans.iterdir())
    args = {
        "embed": ["embed", str(tiny_checkpoint), str(scan), "--out", str(tmp_path / "e.csv")],
        "evaluate": ["evaluate", str(tiny_checkpoint), "--images", str(scan), "--out", str(tmp_path / "ev")],
    }[command]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--device", "cpu"])
    assert f"cpu budget: 1 of {HOST} cores (--threads)" in result.output


def test_the_command_line_sets_openmp_to_sleep_before_torch_loads_on_a_shared_machine():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI module must set it before importing torch.
    A SLURM job shares its node: its threads sleep."""
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    code = "import os, ctmae.cli; print(os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env={**env, "SLURM_JOB_ID": "7"},
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["PASSIVE", "0"], out.stderr[-2000:]
    order = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert order.index("ctmae.runtime.openmp") < order.index("torch")
    code = "import os, ctmae.cli; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('KMP_BLOCKTIME'))"
    kept = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True
    )
    assert kept.stdout.split() == ["ACTIVE", "None"]  # a policy the user set is kept as it is


def test_openmp_threads_sleep_beside_busy_processes_and_spin_on_an_idle_machine(monkeypatch):
    """Two busy loops running: the sample at start sees them and the threads sleep. An idle machine (sample
    faked: the test machine may be busy) leaves libgomp's spin; every cap that marks a shared machine sleeps."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOST)]
    try:
        time.sleep(0.3)
        busy = openmp.busy_cores()
        env: dict[str, str] = {}
        policy = openmp.choose_wait_policy(env)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert busy is not None and busy >= 0.8 * HOST, busy
    assert policy.startswith("sleep (") and "cores busy at start" in policy
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    monkeypatch.setattr(openmp, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(openmp, "cgroup_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(HOST)))
    idle: dict[str, str] = {}
    assert openmp.choose_wait_policy(idle) == "spin (machine idle at start)" and idle == {}
    for name in ("SLURM_JOB_ID", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "CTMAE_THREADS"):
        assert openmp.choose_wait_policy({name: "2"}) == f"sleep ({name})"
    monkeypatch.setattr(openmp, "cgroup_quota", lambda: HOST / 2)
    assert openmp.choose_wait_policy({}) == "sleep (cgroup quota)"
    assert openmp.choose_wait_policy({"GOMP_SPINCOUNT": "5000"}).startswith("as set")


def test_another_ctmae_command_marks_the_machine_shared(monkeypatch):
    """Two commands started together each sample the machine while the other still sleeps in its own sample: a
    running ctmae command (the console script, here a process whose argv[0] is ``ctmae``) is counted instead."""
    monkeypatch.setattr(openmp, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(openmp, "cgroup_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(HOST)))
    before = openmp.other_ctmae_runs()
    other = subprocess.Popen(["bash", "-c", "exec -a ctmae sleep 30"])
    try:
        time.sleep(0.3)
        assert openmp.other_ctmae_runs() == before + 1
        assert openmp.choose_wait_policy({}) == f"sleep ({before + 1} other ctmae run(s))"
    finally:
        other.kill()
        other.wait()
    assert openmp.other_ctmae_runs() == before
