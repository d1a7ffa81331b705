"""A real 2-process CPU run (torchrun + gloo) of train.py, its eval numbers, and resuming across process counts."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from catchup.runs import latest_checkpoint, load_run
from catchup.data import build_datasets
from tests.helpers import TINY, run_train

ROOT = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
       "WANDB_MODE": "disabled"}


def torchrun_command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
            "--config", "configs/quickstart.yaml", "--output", str(output), *TINY, *extra]


def torchrun_train(output: Path, *extra: str) -> str:
    proc = subprocess.run(torchrun_command(output, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_two_processes_train_evaluate_and_resume_across_process_counts(tmp_path):
    out = tmp_path / "ddp"
    log = torchrun_train(out, "--epochs", "1")
    assert "2 process(es)" in log                  # fails if torchrun silently fell back to one process
    row = list(csv.DictReader((out / "summary.csv").open()))[-1]

    # the gathered eval top-1 (360 images, 16 per process per batch: the last batch is uneven) equals a
    # plain single-process loop over the same weights
    run = load_run(out)
    _, eval_set, _ = build_datasets("digits", None, train_transform=False)
    correct = 0
    with torch.no_grad():
        for i in range(len(eval_set)):
            x, y = eval_set[i]
            correct += int(run.model(x[None]).argmax(1).item() == y)
    assert abs(float(row["eval_top1"]) - 100.0 * correct / len(eval_set)) < 1e-6
    assert int(float(row["eval_n"])) == len(eval_set)

    # the 2-process checkpoint resumes on one process and finishes the run
    first = latest_checkpoint(out)
    run_train(out, "--epochs", "2", "--resume")
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert latest_checkpoint(out) != first

    # ... and the 1-process checkpoint resumes on two
    assert "2 process(es)" in torchrun_train(out, "--epochs", "3", "--resume")
    assert [r["epoch"] for r in csv.DictReader((out / "summary.csv").open())] == ["0", "1", "2"]


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (its children carry their rank in the environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_one_checkpoint(tmp_path):
    """A scheduler may signal one node before the other: the processes agree at the next log step."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun_command(out, "--epochs", "4", "--checkpoint-every-steps", "1"), cwd=ROOT,
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step_00000003":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    worker = _worker_of_rank(proc.pid, rank=1)
    assert worker is not None
    os.kill(worker, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    stops = re.findall(r"stopped by (SIGTERM|a stop signal on another process) at step (\d+)", stderr)
    assert sorted(why for why, _ in stops) == ["SIGTERM", "a stop signal on another process"], stderr[-3000:]
    step = int(stops[0][1])
    assert int(stops[1][1]) == step and latest_checkpoint(out).name == f"step_{step:08d}"
    assert step < 4 * 11 and not (out / "results.json").exists()    # 11 steps per epoch
    run_train(out, "--epochs", "4", "--resume")             # the checkpoint finishes on one process
    assert json.loads((out / "results.json").read_text())["epochs_done"] == 4
