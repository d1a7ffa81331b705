"""The run folder: who may write it, where it may be, whether it has room, and what `--resume` may change. No
torch here, so a mistake is reported in a second.

- one writer per run folder: process 0 holds an OS lock (``.writer.lock``, via filelock) for the run's life; the
  kernel drops it when the holder dies, so a stale lock is simply taken over;
- the output folder (or the nearest folder that exists above it) takes a file, and does not lie inside another
  run's folder (its checkpoints included);
- a new run does not land on an old one; ``--overwrite`` moves the old run aside only once the new one can start;
- ``--resume`` trains the recipe the run was started with: only the keys in RESUMABLE may differ, and each
  change is recorded as a comment at the top of the run's config.yaml;
- free space for ``checkpoint_keep + 1`` checkpoints before training starts.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from catchup.config import RESUMABLE, TrainConfig, config_to_dict, dump_config, load_config
from catchup.errors import CatchupError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LOCK = ".writer.lock"
HISTORY_MARK = "# resumed at step "

START_OVER = "start it over with --overwrite (the old run is moved aside) or choose another --output"


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step_{step:08d}"


def staging_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f".incomplete-step_{step:08d}"


def latest_checkpoint(output: Path) -> Path | None:
    pointer = output / CHECKPOINTS / "latest"
    if not pointer.exists():
        return None
    path = output / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


MANIFEST_KEYS = {"step": int, "epoch": int, "step_in_epoch": int, "processes": int, "parts": list, "files": dict}


def read_manifest(folder: Path) -> dict | None:
    """A checkpoint's manifest.json, or None when it is missing or not one (the loader then calls it damaged)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in MANIFEST_KEYS.items()):
        return None
    return manifest


def resume_candidates(output: Path, resume: str | bool) -> list[Path]:
    """The checkpoint folders to try, best first: ``--resume PATH`` alone, or the latest and then the older ones;
    none for a run that stopped before its first checkpoint (it starts again from step 0: it is the same run)."""
    if resume is not True:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise CatchupError(f"--resume: {resume} is not a checkpoint folder")
        return [path]
    latest = latest_checkpoint(output)
    older = sorted((p for p in (output / CHECKPOINTS).glob("step_*") if p.is_dir()), reverse=True)
    found = ([latest] if latest else []) + [p for p in older if p != latest]
    if not found and not (output / "config.yaml").exists():
        raise CatchupError(f"--resume: {output} holds no run to resume (set --output to the run folder)")
    return found


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """Raise unless a file can be created in ``folder``, or (while it does not exist yet) in the nearest folder above.

    The probe file is removed again, so nothing is left behind when a later check fails.
    """
    folder = Path(folder)
    full = folder.absolute()
    existing = next(p for p in (full, *full.parents) if p.exists())
    if not existing.is_dir():
        raise CatchupError(f"cannot write the {what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CatchupError(f"cannot write the {what} {folder}: {err.strerror or err} in {existing}") from None


def _holds_run(out: Path) -> bool:
    return (out / "config.yaml").exists() or (out / CHECKPOINTS).exists()


def _is_run(folder: Path) -> bool:
    """A catchup run folder, not just any folder with a config.yaml (a project folder may have one)."""
    return (folder / "config.yaml").is_file() and ((folder / "data_info.json").is_file()
                                                   or (folder / CHECKPOINTS).is_dir())


class RunLock:
    """The one-writer lock of a run folder; the lock file names its holder (pid and host) for the refusal."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._lock = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise CatchupError(busy(self.path)) from None
        # written once held: a contender opens the file without truncating it, so it can read who holds it
        self.path.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        self._lock = lock
        return self

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def holder(self) -> str | None:
        """``busy``'s message while another process holds the lock, else None; writes nothing."""
        if not self.path.exists():
            return None
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return busy(self.path)
        lock.release()
        return None


def busy(lock_file: Path) -> str:
    try:
        pid, host = lock_file.read_text().split()
        who = f"pid {pid} on {host}"
    except (OSError, ValueError):
        who = "another process"
    return (f"{lock_file.parent} is being written by {who}; wait for that run to end (or stop it) or choose "
            f"another --output")


def check_output(cfg: TrainConfig, resume: str | bool, overwrite: bool, probe_lock: bool = True
                 ) -> dict[str, tuple]:
    """Every check of the output folder before training; changes nothing on disk.

    Returns the recipe keys that differ from the run's config.yaml on resume ({key: (run's value, new value)}).
    """
    out = Path(cfg.output)
    if resume and overwrite:
        raise CatchupError("--resume continues the run in the output folder and --overwrite moves it aside; "
                           "pass one of them")
    check_writable(out)
    full = Path(os.path.abspath(out))
    # also where the path really leads: a symlink to another run's checkpoint would otherwise pass
    real = Path(os.path.realpath(out))
    inside = next((p for p in (*full.parents, *real.parents) if _is_run(p)), None)
    if inside is not None:
        raise CatchupError(f"--output {out} lies inside the run folder {inside}, which it would damage; choose an "
                           f"--output outside every run folder")
    if probe_lock and (message := RunLock(out).holder()):
        raise CatchupError(message)
    if not resume:
        if _holds_run(out) and not overwrite:
            has_checkpoint = any((out / CHECKPOINTS).glob("step_*"))
            advice = ("pass --resume to continue it, --overwrite to start over (the old run is moved aside), "
                      "or choose another --output") if has_checkpoint else \
                f"it stopped before its first checkpoint: continue it with --resume, or {START_OVER}"
            raise CatchupError(f"{out} already holds a run; {advice}")
        if overwrite and _holds_run(out):
            cwd = Path(os.getcwd())
            if cwd == full or full in cwd.parents:
                raise CatchupError(f"--overwrite would move {full} aside while it is the current folder (or holds "
                                   f"it); run the command from outside it")
            check_writable(full.parent, "folder above the output")
        return {}
    if resume is True and not _holds_run(out):
        raise CatchupError(f"--resume: {out} holds no run to resume (set --output to the run folder)")
    candidates = resume_candidates(out, resume)
    if resume is True and candidates and not (out / "config.yaml").exists():
        raise CatchupError(f"--resume: {out} has checkpoints but lost its config.yaml, so the recipe cannot be "
                           f"checked against the run's; put config.yaml back or {START_OVER}")
    if candidates and (manifest := read_manifest(candidates[0])):
        _check_not_past(cfg, manifest)
    return recipe_changes(cfg, out / "config.yaml")


def _check_not_past(cfg: TrainConfig, manifest: dict) -> None:
    """A resume that asks for fewer epochs (or steps) than the checkpoint has done would end at once, with
    weights from later than the recipe says."""
    done = manifest["epoch"] + (1 if manifest["step_in_epoch"] else 0)
    if cfg.epochs < done:
        raise CatchupError(f"--resume: epochs {cfg.epochs} is fewer than the run has already begun ({done}, at step "
                           f"{manifest['step']}); pass --epochs {done} or more")
    if cfg.max_steps and cfg.max_steps < manifest["step"]:
        raise CatchupError(f"--resume: max_steps {cfg.max_steps} is fewer than the run has done "
                           f"({manifest['step']}); pass --max-steps {manifest['step']} or more, or 0")


def recipe_changes(cfg: TrainConfig, run_config: Path) -> dict[str, tuple]:
    """{key: (run's value, new value)} of the RESUMABLE keys that differ; any other difference is refused."""
    if not run_config.exists():
        return {}       # `--resume PATH` into a fresh output folder: the checkpoint alone defines the run
    old = config_to_dict(load_config(run_config))
    new = config_to_dict(cfg)
    changed = {k: (old[k], new[k]) for k in new if old[k] != new[k]}
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"{k} (run {a!r}, now {b!r})" for k, (a, b) in fixed.items())
        raise CatchupError(f"--resume: the recipe differs from the run's {run_config} in {listed}; these cannot "
                           f"change on resume (only {', '.join(RESUMABLE)} can): {START_OVER}")
    return changed


def record_resume(cfg: TrainConfig, run_config: Path, changes: dict[str, tuple], step: int) -> None:
    """Rewrite config.yaml with the new values, keeping one comment line per resume that changed something."""
    if not changes:
        return
    history = [line[2:] for line in run_config.read_text(encoding="utf-8").splitlines()
               if line.startswith(HISTORY_MARK)] if run_config.exists() else []
    history.append(f"{HISTORY_MARK[2:]}{step}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    dump_config(cfg, run_config, notes=history)


def free_bytes(folder: Path) -> int:
    full = Path(os.path.abspath(folder))
    return shutil.disk_usage(next(p for p in (full, *full.parents) if p.exists())).free


def check_free_space(output: Path, per_checkpoint: int, keep: int, overwrite: bool = False) -> None:
    """Refuse when the disk cannot hold ``keep + 1`` checkpoints (the new one is written before the oldest goes);
    the checkpoints a resumed run already has are rotated away, so they count as room. Those of a run that
    ``--overwrite`` moves aside stay on the disk, so they do not."""
    existing = 0 if overwrite else sum(1 for p in (Path(output) / CHECKPOINTS).glob("step_*") if p.is_dir())
    needed = per_checkpoint * max(1, keep + 1 - existing)
    free = free_bytes(output)
    if free < needed:
        raise CatchupError(f"not enough free space for {output}: {keep + 1} checkpoints of about "
                           f"{_size(per_checkpoint)} need {_size(needed)}, {_size(free)} are free; free some space, "
                           f"lower checkpoint_keep (now {keep}) or choose another --output")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def claim_output(cfg: TrainConfig, resume: str | bool, overwrite: bool) -> RunLock:
    """Take the run folder's lock (main process), check the folder again under it, and for ``--overwrite`` move
    the old run aside; the first write into the run folder, so call it once the run is known to be able to start."""
    out = Path(os.path.abspath(cfg.output))
    lock = RunLock(out).acquire()
    try:
        check_output(cfg, resume, overwrite, probe_lock=False)
        if overwrite and _holds_run(out):
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out, aside)
            old, lock = lock, RunLock(out).acquire()
            old.release()
            print(f"moved the previous run to {aside}")
    except BaseException:
        lock.release()
        raise
    return lock
