"""The sweep as a SLURM job array: the dry run's tasks against the local runner's commands, and a whole array run
by a fake sbatch (one task pre-empted with SIGUSR1, requeued and resumed) whose runs carry the sweep's W&B group."""
import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from catchup.sweep import Sweep, grid_points, parse_grid
from catchup.sweep_slurm import array_spec
from tests.helpers import load_safetensors, wandb_records

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-kwargs", "{width: 4}", "--batch-size", "32", "--train-fraction", "0.25", "--workers", "0",
        "--max-steps", "24", "--checkpoint-every-steps", "6", "--log-every", "2"]

# sbatch, srun and scontrol as a one-machine cluster: sbatch runs the array's tasks, %N at a time, each again after
# a `scontrol requeue`; srun runs train.py directly as one node of one process
FAKE_SBATCH = """\
    import json, os, subprocess, sys
    from concurrent.futures import ThreadPoolExecutor
    state = os.environ["FAKE_SLURM_DIR"]
    with open(os.path.join(state, "calls.jsonl"), "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    spec, _, limit = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--array=")).partition("%")
    indices = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        indices += range(int(first), int(last or first) + 1)

    def task(index):
        job, restarts = str(1000 + index), 0
        while True:
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_JOB_ID": job, "SLURM_NNODES": "1",
                   "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": os.getcwd(),
                   "SLURM_RESTART_COUNT": str(restarts)}
            with open(os.path.join(state, f"task-{index}.out"), "a") as out:
                proc = subprocess.Popen(["bash", sys.argv[-1]], env=env, stdout=out, stderr=subprocess.STDOUT)
                with open(os.path.join(state, f"task-{index}.pid"), "w") as f:
                    f.write(str(proc.pid))
                code = proc.wait()
            with open(os.path.join(state, "exits.jsonl"), "a") as f:
                f.write(json.dumps([index, code]) + "\\n")
            requeue = os.path.join(state, f"requeue-{job}")
            if not os.path.exists(requeue):
                return
            os.remove(requeue)
            restarts += 1

    if not os.environ.get("FAKE_SLURM_NO_RUN"):
        with ThreadPoolExecutor(int(limit or len(indices))) as pool:     # the %N limit, as SLURM keeps it
            list(pool.map(task, indices))
    print("999")
"""
FAKE_SRUN = """\
    #!/bin/bash
    # srun --kill-on-bad-exit=1 bash slurm/launch_node.sh RECIPE ARGS...
    shift 3
    RECIPE=$1
    shift
    OMP_NUM_THREADS=1 exec {python} train.py --config "$RECIPE" "$@"
"""
FAKE_SCONTROL = """\
    #!/bin/bash
    case "$1" in
      requeue) touch "$FAKE_SLURM_DIR/requeue-$2" ;;
      show) echo localhost ;;
    esac
"""


def fake_cluster(tmp_path: Path) -> dict[str, str]:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm_state"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {"sbatch": f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SBATCH),
               "srun": textwrap.dedent(FAKE_SRUN).format(python=sys.executable),
               "scontrol": textwrap.dedent(FAKE_SCONTROL)}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state),
            "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def test_array_spec_compresses_runs_and_caps_concurrency():
    assert array_spec([0, 1, 2, 5, 7, 8], 3) == "0-2,5,7-8%3"
    assert array_spec([4], None) == "4"


def test_dry_run_prints_one_array_task_per_grid_point_with_the_local_runners_command(tmp_path):
    out = tmp_path / "sw"
    grid = ["mix=none,cutmix,catchup", "seed=0,1"]
    proc = subprocess.run([sys.executable, "-m", "catchup.sweep", "--config", "configs/quickstart.yaml", "--grid",
                           *grid, "--output", str(out), "--epochs", "2", "--name", "table1", "--max-running", "2",
                           "--dry-run", "--slurm", "--time", "1:00:00", "--partition", "gpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"$ sbatch --parsable --array=0-5%2 --time 1:00:00 --partition gpu {out}/slurm/array.sbatch"
    tasks = [line for line in lines if line.startswith("task ")]
    args = argparse.Namespace(config=Path("configs/quickstart.yaml"), name="table1", output=out, threads=1, jobs=1,
                              gpus=[])
    points = grid_points(parse_grid(grid), out / "runs")
    local = Sweep(args, ["--epochs", "2"], points)
    assert len(tasks) == len(points) == 6
    for i, (task, point) in enumerate(zip(tasks, points)):
        head, command = task.split(": ", 1)
        assert head == f"task {i} [{point.label()}; submitted]"
        assert shlex.split(command)[1:] == local.train_command(point, "new")[2:]
        # and the script maps array index i to the same arguments
        assert f"  {i}) TASK=({shlex.join(shlex.split(command)[2:])}) ;;" in proc.stdout
    assert "#SBATCH --job-name=table1" in lines and "#SBATCH --signal=B:USR1@300" in lines
    assert "exec bash slurm/train_multinode.sbatch \"${TASK[@]}\"" in lines
    assert not out.exists()      # a dry run writes nothing


def _wait_for(condition, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the array did not get there in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def array_run(tmp_path_factory):
    """A 2x2 digits grid through the fake sbatch, grid point 3 pre-empted with SIGUSR1 after its first checkpoint.
    The second grid key is wandb_mode: its two values train the same weights, so the pre-empted run has an
    uninterrupted twin (grid point 2), and the offline runs show the W&B group."""
    tmp_path = tmp_path_factory.mktemp("array")
    env = fake_cluster(tmp_path)
    out = tmp_path / "sw"
    command = [sys.executable, "-m", "catchup.sweep", "--config", "configs/quickstart.yaml", "--grid",
               "mix=none,cutmix", "wandb_mode=offline,disabled", "--output", str(out), "--name", "digits-grid",
               "--max-running", "2", *TINY, "--slurm", "--time", "0:30:00"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = out / "runs" / "mix=cutmix_wandb_mode=disabled"
    pid_file = Path(env["FAKE_SLURM_DIR"]) / "task-3.pid"
    _wait_for(lambda: pid_file.exists() and (target / "checkpoints" / "latest").exists(), proc)
    os.kill(int(pid_file.read_text()), signal.SIGUSR1)       # what SLURM sends the batch shell before the limit
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    return {"env": env, "out": out, "command": command, "output": output, "state": Path(env["FAKE_SLURM_DIR"])}


@pytest.mark.slow
def test_array_runs_every_point_and_the_preempted_task_resumes_to_the_same_weights(array_run):
    out, state = array_run["out"], array_run["state"]
    (call,) = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert call == ["--parsable", "--array=0-3%2", "--time", "0:30:00", str(out / "slurm" / "array.sbatch")]
    exits = sorted(json.loads(line) for line in (state / "exits.jsonl").read_text().splitlines())
    assert exits == [[0, 0], [1, 0], [2, 0], [3, 0], [3, 0]]     # task 3 ran twice: pre-empted, then requeued
    log = (state / "task-3.out").read_text()
    assert "time limit near" in log and "resumed from" in log
    runs = out / "runs"
    assert all((runs / n / "results.json").exists() for n in (
        "mix=none_wandb_mode=offline", "mix=none_wandb_mode=disabled", "mix=cutmix_wandb_mode=offline",
        "mix=cutmix_wandb_mode=disabled"))
    resumed = load_safetensors(runs / "mix=cutmix_wandb_mode=disabled" / "model.safetensors")
    straight = load_safetensors(runs / "mix=cutmix_wandb_mode=offline" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(resumed[k].equal(straight[k]) for k in resumed)
    assert "submitted job array 999 (4 task(s): --array=0-3%2)" in array_run["output"]


def test_runs_carry_the_sweeps_wandb_group_grid_values_and_provenance(array_run):
    runs = array_run["out"] / "runs"
    for mix in ("none", "cutmix"):
        run = runs / f"mix={mix}_wandb_mode=offline"
        (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        records = wandb_records(file)
        assert {r.run.run_group for r in records if r.HasField("run")} == {"digits-grid"}
        config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
        assert config["mix"] == mix and config["wandb_mode"] == "offline" and config["wandb_group"] == "digits-grid"
        results = json.loads((run / "results.json").read_text())
        assert config["provenance"]["git_commit"] == results["provenance"]["git_commit"]
    results = json.loads((runs / "mix=cutmix_wandb_mode=disabled" / "results.json").read_text())
    prov = results["provenance"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert prov["git_commit"] == commit and isinstance(prov["git_dirty"], bool)
    assert prov["code"] == [commit + ("+dirty" if prov["git_dirty"] else "")]
    assert prov["num_processes"] == 1 and prov["device"] == "cpu" and prov["cpu"]
    assert {"python", "torch", "timm", "accelerate"} <= prov.keys() and all(prov[k] for k in ("torch", "timm"))
    assert "train.py --config configs/quickstart.yaml --mix cutmix" in prov["command"]
    assert len((runs / "mix=cutmix_wandb_mode=disabled" / "provenance.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_rerun_submits_only_unfinished_points_and_collect_logs_the_wandb_table(array_run):
    out, env, state = array_run["out"], {**array_run["env"], "FAKE_SLURM_NO_RUN": "1"}, array_run["state"]
    again = subprocess.run(array_run["command"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr
    (out / "runs" / "mix=none_wandb_mode=disabled" / "results.json").rename(out / "results.json.kept")
    again = subprocess.run(array_run["command"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and calls[-1][1] == "--array=1%2"
    # while SLURM still lists that array, submitting again would put a second writer on its run
    squeue = Path(env["PATH"].split(os.pathsep)[0]) / "squeue"
    squeue.write_text("#!/bin/bash\necho 999_1\n")
    squeue.chmod(0o755)
    refused = subprocess.run(array_run["command"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    squeue.unlink()
    assert refused.returncode == 2 and refused.stderr.startswith("error: --slurm: job(s) 999 of this sweep are still")
    assert len((state / "calls.jsonl").read_text().splitlines()) == 2
    (out / "results.json.kept").rename(out / "runs" / "mix=none_wandb_mode=disabled" / "results.json")

    collect = subprocess.run([*array_run["command"][:array_run["command"].index("--slurm")], "--collect"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stderr
    assert "All 4 runs were made by code" in (out / "table.md").read_text()
    (file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(file)
    assert {r.run.run_group for r in records if r.HasField("run")} == {"digits-grid"}
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in
              out.glob("wandb/offline-run-*/files/media/table/sweep/*.table.json")}
    assert set(tables) == {"table", "runs"}
    assert len(tables["runs"]["data"]) == 4 and len(tables["table"]["data"]) == 4
    last = tables["table"]["columns"].index("last_mean")
    with (out / "table.csv").open() as f:
        expected = [float(r["last_mean"]) for r in csv.DictReader(f)]
    assert [row[last] for row in tables["table"]["data"]] == pytest.approx(expected)
