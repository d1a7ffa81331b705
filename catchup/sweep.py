"""Run a grid of train.py runs, a few at a time, and tabulate them (mean +- std over seeds).

    python -m catchup.sweep --config configs/quickstart.yaml --grid mix=none,cutmix,catchup seed=0,1,2 \\
        --output sweeps/qs --jobs 2 --epochs 20 --wandb-mode disabled
    python -m catchup.sweep ... --collect           # the same command: only rebuild the table from the runs
    python -m catchup.sweep ... --slurm --partition gpu --time 24:00:00   # one SLURM array task per grid point

Every grid point is an ordinary run folder `<output>/runs/<key>=<value>_...` made by train.py, so it can be
resumed, evaluated and loaded like any other run. Arguments the sweep does not know (`--epochs 20`) are recipe
overrides applied to every run. Runs are ordered seed by seed, so a sweep cut short has every point's first
seeds. Rerunning the command skips finished runs (results.json present), resumes a run that has a checkpoint
and restarts one that stopped before its first. The table goes to `<output>/table.{csv,md,png}` and
`<output>/runs.csv` (one row per run).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from catchup.cli import ArgumentParser, run_cli, user_path
from catchup.config import load_config
from catchup.errors import CatchupError
from catchup.rundir import latest_checkpoint   # not catchup.runs, which loads torch and timm
from catchup.sweep_grid import (Point, grid_points, parse_grid, point_overrides,  # noqa: F401 (re-exported)
                                point_recipe, refuse_equal_points, run_name, split_values, train_args)
from catchup.sweep_slurm import split_argv, submit
from catchup.sweep_table import (METRICS, TIME_FILE, code_note, code_versions, collect_runs, log_wandb_table,
                                 write_tables)

SCRIPTS = Path(__file__).resolve().parents[1]   # train.py and evaluate.py


def state_of(run_dir: Path) -> str:
    """'done' (results.json), 'resume' (a complete checkpoint), 'restart' (started, no checkpoint) or 'new'."""
    if (run_dir / "results.json").exists():
        return "done"
    if latest_checkpoint(run_dir) is not None:
        return "resume"
    if (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists():
        return "restart"
    return "new"


class Sweep:
    """Starts train.py (and evaluate.py) subprocesses, at most `jobs` at a time, and can stop them all."""

    def __init__(self, args: argparse.Namespace, fixed: list[str], points: list[Point]) -> None:
        self.args, self.fixed, self.points = args, fixed, points
        self.logs = args.output / "logs"
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        threads = max(1, args.threads // args.jobs)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "PYTHONUNBUFFERED": "1"}
        # one device per job slot (devices repeat when there are more jobs than devices)
        self.devices: queue.Queue[str] = queue.Queue()
        for slot in range(args.jobs if args.gpus else 0):
            self.devices.put(args.gpus[slot % len(args.gpus)])

    def train_command(self, point: Point, state: str) -> list[str]:
        cmd = [sys.executable, str(SCRIPTS / "train.py"), *train_args(self.args, self.fixed, point)]
        return cmd + {"resume": ["--resume"], "restart": ["--overwrite"], "new": []}[state]

    def eval_command(self, point: Point) -> list[str]:
        return [sys.executable, str(SCRIPTS / "evaluate.py"), "--run", str(point.run_dir),
                "--suite", self.args.eval_suite, "--workers", "0", *self.args.eval_args.split()]

    def call(self, cmd: list[str], log: Path) -> tuple[int, float, float]:
        """Run cmd with its output appended to log: (exit code, wall seconds, CPU seconds of it and its children)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            device = self.devices.get() if self.args.gpus else None
            env = self.env if device is None else {**self.env, "CUDA_VISIBLE_DEVICES": device}
            start = time.perf_counter()
            try:
                with self.lock:
                    if self.stopping:
                        return 130, 0.0, 0.0
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                    self.children.add(proc)
                # wait4 rather than Popen.wait: it also reports the child's CPU time, unaffected by other jobs
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                with self.lock:
                    self.children.discard(proc)
            finally:
                if device is not None:
                    self.devices.put(device)
        return proc.returncode, time.perf_counter() - start, usage.ru_utime + usage.ru_stime

    def run_point(self, point: Point) -> tuple[Point, str, str]:
        """Train (and evaluate) one point: (point, what happened, detail)."""
        state = state_of(point.run_dir)
        if state != "done":
            code, wall, cpu = self.call(self.train_command(point, state), self.logs / f"{point.name}.log")
            if point.run_dir.is_dir():     # interrupted attempts count too: their checkpoints are built on
                _add_time(point.run_dir, wall, cpu)
            if code != 0 or state_of(point.run_dir) != "done":
                return point, "failed", f"train.py exit {code}; log: {self.logs / (point.name + '.log')}"
        if self.args.evaluate and not (point.run_dir / "eval" / "report.json").exists():
            code, _, _ = self.call(self.eval_command(point), self.logs / f"{point.name}.eval.log")
            if code != 0:
                return point, "failed", f"evaluate.py exit {code}; log: {self.logs / (point.name + '.eval.log')}"
        return point, ("skipped" if state == "done" else state), ""

    def stop(self) -> None:
        """Ctrl-C or SIGTERM: stop the children with SIGTERM, on which train.py writes a checkpoint and exits.
        Not SIGINT: children of a sweep started in the background (`&`, nohup) ignore it."""
        with self.lock:
            self.stopping = True
            for proc in self.children:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def run(self) -> list[tuple[Point, str, str]]:
        done: list[tuple[Point, str, str]] = []
        total = len(self.points)
        pool = ThreadPoolExecutor(max_workers=self.args.jobs)
        try:
            pending = {pool.submit(self.run_point, p) for p in self.points}
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    done.append(future.result())
                    print(progress_line(len(done), total, *done[-1]), flush=True)
        except KeyboardInterrupt:
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return done


def progress_line(count: int, total: int, point: Point, what: str, detail: str) -> str:
    head = f"[{count}/{total}] {point.label()}:"
    if what == "failed":
        return f"{head} FAILED ({detail})"
    results = json.loads((point.run_dir / "results.json").read_text())
    numbers = ", ".join(f"{short} {results[key]:.2f}" for key, short in METRICS.items() if key in results)
    timing = _read_time(point.run_dir)
    minutes = (f", {timing['wall_s'] / 60:.1f} min ({timing['cpu_s'] / 60:.1f} CPU min)"
               if timing and what != "skipped" else "")
    verb = {"skipped": "already done", "new": "done", "resume": "resumed, done", "restart": "restarted, done"}
    return f"{head} {verb[what]}: {numbers or 'no evaluation'}{minutes}"


def _read_time(run_dir: Path) -> dict | None:
    path = run_dir / TIME_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _add_time(run_dir: Path, wall: float, cpu: float) -> None:
    old = _read_time(run_dir) or {"wall_s": 0.0, "cpu_s": 0.0, "attempts": 0}
    new = {"wall_s": round(old["wall_s"] + wall, 1), "cpu_s": round(old["cpu_s"] + cpu, 1),
           "attempts": old["attempts"] + 1}
    (run_dir / TIME_FILE).write_text(json.dumps(new) + "\n")


def parse_args(argv):
    p = ArgumentParser(prog="python -m catchup.sweep", description=__doc__.splitlines()[0],
                       allow_abbrev=False, epilog="Other --key value arguments are recipe overrides for every run.")
    p.add_argument("-c", "--config", type=user_path,
                   help="recipe YAML shared by every run (or a grid over recipes: --grid config=a.yaml,b.yaml)")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="recipe keys and their values; one run per combination")
    p.add_argument("--output", required=True, type=user_path, help="sweep folder: runs/, logs/, table.*")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared among the jobs (each gets threads // jobs)")
    p.add_argument("--gpus", type=lambda t: [g.strip() for g in t.split(",") if g.strip()], default=[],
                   help="comma-separated GPU ids; each job gets one as CUDA_VISIBLE_DEVICES (default: unchanged)")
    p.add_argument("--seed-key", default="seed", help="grid key averaged over in the table")
    p.add_argument("--evaluate", action="store_true",
                   help="also run evaluate.py on each run; its numbers join the table")
    p.add_argument("--eval-suite", default="clean,fgsm,deformation", help="evaluate.py --suite for --evaluate")
    p.add_argument("--eval-args", default="", help="extra evaluate.py arguments, one string")
    p.add_argument("--baseline", default=None, metavar="KEY=VALUE",
                   help="add each point's last top-1 minus this grid point's, seed by seed (e.g. mix=none)")
    p.add_argument("--collect", action="store_true", help="train nothing: rebuild the table from the run folders")
    p.add_argument("--name", default=None,
                   help="the sweep's name: every run's W&B group and the SLURM job name (default: --output's name)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's command (with --slurm: the sbatch command, its script and each array "
                        "task's command) and change nothing")
    p.add_argument("--max-running", type=int, default=None, metavar="N",
                   help="with --slurm: at most N array tasks at a time (sbatch --array=...%%N)")
    p.add_argument("--slurm", action="store_true",
                   help="submit the runs without results.json as one SLURM job array, one task per grid point; "
                        "everything after --slurm is passed to sbatch (e.g. --slurm --partition gpu --nodes 2)")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    own, sbatch_options = split_argv(sys.argv[1:] if argv is None else argv)
    args, fixed = parse_args(own)
    if args.jobs < 1 or args.threads < 1 or (args.max_running is not None and args.max_running < 1):
        raise CatchupError("--jobs, --threads and --max-running must be >= 1")
    if sbatch_options is not None and args.evaluate and not args.collect:
        raise CatchupError("--evaluate runs evaluate.py where the sweep runs, not in the array: once the array has "
                           "finished, run the same command without --slurm and with --evaluate")
    if "--output" in fixed or any(a.startswith("--output=") for a in fixed):
        raise CatchupError("--output is the sweep folder; each run's output is set by the sweep")
    args.name = args.name or args.output.absolute().name
    grid = parse_grid(args.grid)
    baseline = _baseline(args.baseline, grid, args.seed_key)
    points = grid_points(grid, args.output / "runs", args.seed_key)
    # every recipe is checked before anything starts
    if (args.config is None) == ("config" not in grid):
        raise CatchupError("give the recipe either as --config or as the grid key config=a.yaml,b.yaml, not both")
    configs = [load_config(point_recipe(args, p), [*point_overrides(p), *fixed]) for p in points]
    refuse_equal_points(points, configs, grid)
    for point, cfg in zip(points, configs):
        point.wandb = cfg.wandb_mode != "disabled"
    if args.dry_run:
        _dry_run(args, fixed, points, sbatch_options)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.collect:
        (args.output / "sweep.json").write_text(json.dumps(
            {"command": ["python", "-m", "catchup.sweep", *(argv if argv is not None else sys.argv[1:])],
             "config": None if args.config is None else str(args.config), "grid": grid, "overrides": fixed,
             "name": args.name}, indent=2) + "\n")
        todo = [i for i, p in enumerate(points) if state_of(p.run_dir) != "done"]
        if sbatch_options is not None:
            submit(args.output, args.name, [p.label() for p in points],
                   [train_args(args, fixed, p) for p in points], todo, sbatch_options, args.max_running, False)
        else:
            print(f"sweep: {len(points)} runs ({len(todo)} to train), {args.jobs} at a time, "
                  f"{max(1, args.threads // args.jobs)} thread(s) each, in {args.output}", flush=True)
            sweep = Sweep(args, fixed, points)
            signal.signal(signal.SIGTERM, _interrupt)
            failed = [(p, d) for p, what, d in sweep.run() if what == "failed"]
    group_keys = [k for k in grid if k != args.seed_key]
    rows = collect_runs(points, group_keys, args.seed_key)
    paths = write_tables(rows, args.output, group_keys, args.seed_key, baseline)
    print(f"table of {len(rows)} finished runs: {', '.join(str(p) for p in paths)}")
    if len(code_versions(rows)) > 1:
        print(code_note(rows), file=sys.stderr)
    modes = [c.wandb_mode for c in configs if c.wandb_mode != "disabled"]
    if rows and modes and sbatch_options is None:    # not at a submission: the array's runs have yet to finish
        log_wandb_table(rows, args.output, group_keys, args.seed_key, baseline, name=args.name, mode=modes[0],
                        project=configs[0].wandb_project, entity=configs[0].wandb_entity)
    for point, detail in failed:
        print(f"failed: {point.label()} ({detail})", file=sys.stderr)
    return 1 if failed else 0


def _dry_run(args: argparse.Namespace, fixed: list[str], points: list[Point], sbatch_options) -> None:
    """Print what would run, change nothing."""
    todo = [i for i, p in enumerate(points) if state_of(p.run_dir) != "done"]
    if sbatch_options is not None:
        submit(args.output, args.name, [p.label() for p in points], [train_args(args, fixed, p) for p in points],
               todo, sbatch_options, args.max_running, True)
        return
    sweep = Sweep(args, fixed, points)
    for point in points:
        state = state_of(point.run_dir)
        print(f"{point.label()}: " + ("done" if state == "done" else shlex.join(sweep.train_command(point, state))))


def _baseline(text: str | None, grid: dict[str, list[str]], seed_key: str) -> tuple[str, str] | None:
    if text is None:
        return None
    key, _, value = text.partition("=")
    if key not in grid or key == seed_key or value not in grid[key]:
        example = next((f"{k}={v[0]}" for k, v in grid.items() if k != seed_key), "mix=none")
        raise CatchupError(f"--baseline {text}: name a grid key other than {seed_key} and one of its values, "
                           f"e.g. --baseline {example}")
    return key, value


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt   # SIGTERM (a batch system, kill) stops the runs the way Ctrl-C does


def _main() -> None:
    if main():
        sys.exit(1)


if __name__ == "__main__":
    run_cli(_main, interrupted="interrupted: rerun the same command to resume the sweep")
