"""A real 2-process CPU run (torchrun + gloo) of train.py, its eval numbers, and resuming across process counts."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from catchup.runs import latest_checkpoint, load_run
from catchup.data import build_datasets
from tests.helpers import TINY, run_train

ROOT = Path(__file__).resolve().parents[1]


def torchrun_train(output: Path, *extra: str) -> str:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--config", "configs/quickstart.yaml", "--output", str(output), *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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
