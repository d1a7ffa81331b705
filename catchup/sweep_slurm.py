"""The sweep's grid as one SLURM job array: `python -m catchup.sweep ... --slurm [sbatch options]`.

Array task i is grid point i (the sweep's order), and each task runs slurm/train_multinode.sbatch with that
point's train.py arguments, so it goes through the same launch path as a single run: `accelerate launch` on each
of its nodes (`--nodes N` among the sbatch options), SIGUSR1 before the time limit -> checkpoint -> requeue ->
resume. The sbatch options given after --slurm go to sbatch's command line, where they override the script's
#SBATCH lines.

Plain `sbatch --array` with a generated script rather than submitit: the script is one file a user can read,
resubmit and debug with SLURM's own tools, it reuses the launch and requeue path single runs already have (submitit
would bring its own, pickling a Python callable per task and requeueing through its own signal handler), and it
needs nothing installed beside SLURM.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from catchup.errors import CatchupError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = Path("slurm") / "train_multinode.sbatch"      # relative: the tasks run from the repository root
# set by the generated script itself (or by the sweep on sbatch's command line); refused among the user's options
OWNED = ("--array", "-a", "--job-name", "-J", "--output", "-o", "--parsable")


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(the sweep's own arguments, the sbatch options after --slurm, or None without --slurm)."""
    argv = list(argv)
    if "--slurm" not in argv:
        return argv, None
    at = argv.index("--slurm")
    options = argv[at + 1:]
    for option in options:
        name = option.split("=", 1)[0]
        if name in OWNED or (name[:2] in ("-a", "-J", "-o") and not name.startswith("--")):
            raise CatchupError(f"--slurm: {option} is set by the sweep (one array task per grid point, "
                               f"--max-running for the %N limit, logs in the sweep folder)")
    return argv[:at], options


def array_spec(indices: Sequence[int], max_running: int | None) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (and '%N' with a concurrency limit)."""
    parts, start = [], None
    for pos, index in enumerate(indices):
        if start is None:
            start = index
        if pos + 1 == len(indices) or indices[pos + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{max_running}" if max_running else "")


def _template_directives() -> list[str]:
    """train_multinode.sbatch's #SBATCH lines (signal before the limit, requeue, resources) but its name and log."""
    lines = (REPO / TEMPLATE).read_text().splitlines()
    return [line for line in lines if line.startswith("#SBATCH")
            and not line.split()[1].startswith(("--job-name", "--output"))]


def script(name: str, labels: Sequence[str], task_args: Sequence[Sequence[str]], logs: Path) -> str:
    """The array's batch script: task i runs the launch script with grid point i's train.py arguments
    (`--config RECIPE ...`, which the launch script takes as `RECIPE ...`)."""
    cases = "\n".join(f"  {i}) TASK=({shlex.join(args[1:])}) ;;  # {' '.join(label.split())}"
                      for i, (label, args) in enumerate(zip(labels, task_args)))
    return f"""#!/bin/bash
# Sweep {name}: one array task per grid point, written by python -m catchup.sweep --slurm (see sweep.json).
# Each task is one run through {TEMPLATE}: accelerate launch on every node, SIGUSR1
# before the time limit -> checkpoint -> requeue -> resume. Rerunning the sweep command submits only the points
# without results.json.
#SBATCH --job-name={name}
{chr(10).join(_template_directives())}
#SBATCH --output={logs}/slurm-%A_%a.out
set -euo pipefail
# processes per node for accelerate launch: the GPUs asked for with --gpus-per-node (type:count or count), else 8
GPUS="${{SLURM_GPUS_PER_NODE:-8}}"
export GPUS_PER_NODE="${{GPUS_PER_NODE:-${{GPUS##*:}}}}"
case "${{SLURM_ARRAY_TASK_ID:?this script runs as a SLURM array task}}" in
{cases}
  *) echo "no grid point $SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 1 ;;
esac
exec bash {TEMPLATE} "${{TASK[@]}}"
"""


def sbatch_command(options: Sequence[str], spec: str, script_path: Path) -> list[str]:
    return ["sbatch", "--parsable", f"--array={spec}", *options, str(script_path)]


def _still_queued(jobs_file: Path) -> list[str]:
    """Job ids of this sweep's earlier arrays that SLURM still lists (queued or running); [] without squeue."""
    if not jobs_file.exists() or shutil.which("squeue") is None:
        return []
    ids = [json.loads(line)["job"] for line in jobs_file.read_text().splitlines() if line.strip()]
    proc = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", ",".join(ids)], capture_output=True,
                          text=True, timeout=60)
    return sorted({line.split("_")[0] for line in proc.stdout.split()}) if proc.returncode == 0 else []


def submit(output: Path, name: str, labels: Sequence[str], task_args: Sequence[Sequence[str]],
           todo: Sequence[int], options: Sequence[str], max_running: int | None, dry_run: bool) -> None:
    """Write the script and submit the array of the `todo` indices (print both instead with dry_run)."""
    if Path.cwd().resolve() != REPO:
        raise CatchupError(f"--slurm: run the sweep from the repository root ({REPO}): the array's tasks run "
                           f"{TEMPLATE} and train.py from there")
    path = output / "slurm" / "array.sbatch"
    text = script(name, labels, task_args, output / "logs")
    spec = array_spec(todo, max_running)
    command = sbatch_command(options, spec, path)
    if dry_run:
        print(f"$ {shlex.join(command)}\n----- {path} -----\n{text}----- tasks -----")
        for i, (label, args) in enumerate(zip(labels, task_args)):
            state = "submitted" if i in todo else "done, not submitted"
            print(f"task {i} [{label}; {state}]: train.py {shlex.join(args)}")
        print(f"({TEMPLATE} adds --resume when the task's run can be resumed)")
        return
    if not todo:
        print("sweep: every grid point has results.json; nothing to submit")
        return
    running = _still_queued(output / "slurm" / "jobs.jsonl")
    if running:
        raise CatchupError(f"--slurm: job(s) {', '.join(running)} of this sweep are still queued or running; "
                           f"submitting again would start a second writer on their runs (wait, or scancel them)")
    path.parent.mkdir(parents=True, exist_ok=True)
    (output / "logs").mkdir(parents=True, exist_ok=True)   # SLURM does not create the log folder
    path.write_text(text)
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise CatchupError("--slurm: sbatch was not found; run on a SLURM login node (or use --dry-run)") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise CatchupError(f"sbatch failed (exit {proc.returncode}): {detail[-1] if detail else 'no message'}")
    job = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else "?"
    with (output / "slurm" / "jobs.jsonl").open("a") as f:
        f.write(json.dumps({"job": job, "array": spec, "options": list(options), "time": time.time()}) + "\n")
    print(f"sweep: submitted job array {job} ({len(todo)} task(s): --array={spec}); logs in {output / 'logs'}. "
          f"Rerun this command once it has finished to submit what is left; --collect builds the table.")
