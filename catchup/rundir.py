"""Checks on a run folder that come before any work, and need no torch (so a mistake is reported in a second).

- the output folder (or the nearest folder that exists above it) takes a file;
- a new run does not land on an old one, `--resume` finds a run with checkpoints, and not both `--resume`
  and `--overwrite`;
- `--resume` trains the recipe the run was started with: only the keys in RESUMABLE may differ, and each
  change is recorded as a comment at the top of the run's config.yaml.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from catchup.config import TrainConfig, config_to_dict, dump_config, load_config
from catchup.errors import CatchupError

CHECKPOINTS = "checkpoints"
HISTORY_MARK = "# resumed at step "

# Keys that may differ on resume: how long the run goes on (the lr schedule is rebuilt for a new `epochs`), where
# the data and workers come from, how often it is evaluated, logged and checkpointed, and W&B. None of them changes
# what an optimizer step computes. Everything else is the run's identity and is refused.
# torchcompile is here because compiled regions compute what the eager modules compute (tested bit for bit).
RESUMABLE = ("epochs", "max_steps", "output", "data_dir", "download", "workers", "eval_batch_size", "eval_every",
             "checkpoint_every_steps", "checkpoint_keep", "log_every", "torchcompile", "wandb_mode", "wandb_project",
             "wandb_entity", "wandb_name", "wandb_tags", "wandb_log_model")

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


def resume_candidates(output: Path, resume: str | bool) -> list[Path]:
    """The checkpoint folders to try, best first: ``--resume PATH`` alone, or the latest and then the older ones."""
    if resume is not True:
        path = Path(resume)
        if not path.is_dir():
            raise CatchupError(f"--resume: {resume} is not a checkpoint folder")
        return [path]
    latest = latest_checkpoint(output)
    older = sorted((p for p in (output / CHECKPOINTS).glob("step_*") if p.is_dir()), reverse=True)
    found = ([latest] if latest else []) + [p for p in older if p != latest]
    if not found:
        raise CatchupError(f"--resume: the run in {output} stopped before its first checkpoint, so there is "
                           f"nothing to resume; {START_OVER}")
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


def check_output(cfg: TrainConfig, resume: str | bool, overwrite: bool) -> dict[str, tuple]:
    """Every check of the output folder before training; changes nothing on disk.

    Returns the recipe keys that differ from the run's config.yaml on resume ({key: (run's value, new value)}).
    """
    out = Path(cfg.output)
    if resume and overwrite:
        raise CatchupError("--resume continues the run in the output folder and --overwrite moves it aside; "
                           "pass one of them")
    check_writable(out)
    if not resume:
        if _holds_run(out) and not overwrite:
            has_checkpoint = any((out / CHECKPOINTS).glob("step_*"))
            advice = ("pass --resume to continue it, --overwrite to start over (the old run is moved aside), "
                      "or choose another --output") if has_checkpoint else \
                f"it stopped before its first checkpoint; {START_OVER}"
            raise CatchupError(f"{out} already holds a run; {advice}")
        if overwrite and _holds_run(out):
            check_writable(out.parent, "folder above the output")
        return {}
    if resume is True and not _holds_run(out):
        raise CatchupError(f"--resume: {out} holds no run to resume (set --output to the run folder)")
    resume_candidates(out, resume)
    return recipe_changes(cfg, out / "config.yaml")


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


def prepare_output(output: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the output folder; ``--overwrite`` moves an existing run aside first. Run check_output before."""
    out = Path(output)
    if resume:
        return out
    if overwrite and _holds_run(out):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        print(f"moved the previous run to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    return out
