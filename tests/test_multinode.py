"""Two "nodes" on this machine (two torchrun agents meeting at a c10d rendezvous on localhost, one CPU process
each, gloo), their checkpoint resumed on one process; and the SLURM script's per-node launch commands."""
import csv
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from catchup.runs import latest_checkpoint
from tests.helpers import TINY, run_train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_resume_on_one_process(tmp_path):
    out, port = tmp_path / "two_nodes", free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
         "--rdzv_id", "catchup-two-nodes", "--max_restarts", "0",
         "train.py", "--config", "configs/quickstart.yaml", "--output", str(out), *TINY, "--epochs", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    logs = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=400)
            assert node.returncode == 0, stderr[-3000:]
            logs.append(stdout)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert "2 process(es)" in "".join(logs)             # one process per node, both in one job
    assert latest_checkpoint(out).name == "step_00000011"  # global batch 32: 361 samples make 11 steps
    run_train(out, "--epochs", "2", "--resume")          # one process picks up the two-node checkpoint
    assert [r["epoch"] for r in csv.DictReader((out / "summary.csv").open())] == ["0", "1"]


def dry_run(*args: str, output: Path) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "gpu-a01",
           "MASTER_PORT": "29500"}
    env.pop("SLURM_SUBMIT_DIR", None)
    proc = subprocess.run(["bash", "slurm/train_multinode.sbatch", "configs/quickstart.yaml", "--output",
                           str(output), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["node 0", "node 1"]
    return [shlex.split(line.split(":", 1)[1]) for line in lines]


def test_slurm_dry_run_prints_each_nodes_launch_command_for_two_nodes_of_eight_gpus(tmp_path):
    output = tmp_path / "run"
    output.mkdir()                  # a resubmitted job: the run folder holds a run (with or without a checkpoint)
    (output / "config.yaml").write_text("lr: 0.1\n")
    commands = dry_run("--lr", "0.05", "--wandb-name", "two words", output=output)
    for rank, argv in enumerate(commands):
        assert argv == ["accelerate", "launch", "--config_file", "configs/accelerate/multinode.yaml",
                        "--num_machines", "2", "--num_processes", "16", "--machine_rank", str(rank),
                        "--main_process_ip", "gpu-a01", "--main_process_port", "29500",
                        "train.py", "--config", "configs/quickstart.yaml", "--output", str(output),
                        "--lr", "0.05", "--wandb-name", "two words", "--resume"]
        parsed = launch_command_parser().parse_args(argv[2:])   # accelerate itself reads it so
        assert (parsed.num_machines, parsed.num_processes, parsed.machine_rank) == (2, 16, rank)
        assert parsed.training_script == "train.py" and parsed.training_script_args[-2] == "two words"


def test_slurm_script_finds_a_run_under_a_tilde_and_refuses_its_own_flags_in_one_line(tmp_path):
    """The script decides --resume from the run folder: a `~` it left unexpanded would never find the run (every
    requeue refused as a rerun), and a --resume PATH or --overwrite of the user's would repeat on every requeue."""
    home = tmp_path / "home"
    (home / "x").mkdir(parents=True)
    (home / "x" / "config.yaml").write_text("lr: 0.1\n")
    env = {**os.environ, "HOME": str(home), "DRY_RUN": "1", "SLURM_NNODES": "1", "GPUS_PER_NODE": "1",
           "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    env.pop("SLURM_SUBMIT_DIR", None)

    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "slurm/train_multinode.sbatch", "configs/quickstart.yaml", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    assert shlex.split(submit("--output=~/x").stdout)[-1] == "--resume"
    for args, message in ((["--output=~/x", "--overwrite"], "error: --overwrite: train_multinode.sbatch passes "
                           "--resume itself"), (["--resume=~/x/checkpoints/step_1"], "error: --resume=~/x/checkpoints"),
                          (["--lrr", "1"], "error: unknown recipe key 'lrr' on the command line")):
        proc = submit(*args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message), proc.stderr
