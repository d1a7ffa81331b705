"""Train a timm CNN with Catch-up Mix or a mixup baseline.

    accelerate launch train.py --config configs/quickstart.yaml [--lr 0.05 --mix none ...]
    accelerate launch train.py --config configs/quickstart.yaml --resume            # latest checkpoint
    accelerate launch train.py --config configs/x.yaml --resume runs/x/checkpoints/step_00001000

Every recipe key can be overridden on the command line (`--key value`, dashes or underscores).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from catchup.cli import run_cli
from catchup.config import TrainConfig, load_config
from catchup.config_help import RecipeArgumentParser
from catchup.rundir import check_output, record_resume, resume_candidates
from catchup.stopping import stop_signals

if TYPE_CHECKING:
    from catchup.engine import TrainProgress


def parse_args(argv):
    parser = RecipeArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-c", "--config", required=True, help="recipe YAML (configs/...)")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue the run in --output from its latest checkpoint, or from PATH")
    parser.add_argument("--overwrite", action="store_true", help="start over; the existing run is moved aside")
    return parser.parse_known_args(argv)


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    cfg.output = os.path.expanduser(cfg.output)                 # also when the shell did not (`--output=~/x`, YAML)
    # before torch loads: a mistake costs a second. Only the first process looks at the writer lock: several
    # probing it at once would see each other as its holder (the launcher sets RANK for each process).
    changes = check_output(cfg, args.resume, args.overwrite, probe_lock=os.environ.get("RANK", "0") == "0")
    stop_signals()                                               # a bad CATCHUP_STOP_SIGNALS, too
    train(cfg, args, changes)


def train(cfg: TrainConfig, args: argparse.Namespace, changes: dict) -> None:
    """The run itself; torch and everything built on it load only here, once the checks have passed."""
    import torch
    from accelerate.utils import set_seed
    from timm.utils import ModelEmaV3

    from catchup import provenance
    from catchup.analysis import FilterNormTracker
    from catchup.config import config_to_dict, dump_config
    from catchup.compile import compile_backend, compile_model
    from catchup.engine import StepOptions, TrainProgress, eval_due, evaluate, summarize_top1, train_one_epoch
    from catchup.export import log_model_artifact
    from catchup.recipe import (make_accelerator, make_criterion, make_datasets, make_loaders, make_mixer,
                                make_optimizer, make_scheduler, per_device_batch, resolve_wandb_mode,
                                wandb_init_kwargs)
    from catchup.resume import Checkpointer
    from catchup.rundir import check_free_space
    from catchup.runs import build_model, check_norm_batch, class_names, save_data_info, save_weights
    from catchup.stopping import StopOnSignal

    wandb_mode = resolve_wandb_mode(cfg.wandb_mode)
    accelerator = make_accelerator(cfg, wandb_mode)
    main_process = accelerator.is_main_process
    output = Path(cfg.output)
    set_seed(cfg.seed, device_specific=True)

    # data, model, mixer
    train_set, eval_set, info = make_datasets(cfg)
    model = build_model(cfg, info)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mixer = make_mixer(cfg, model, info, accelerator.process_index)
    # after the mixer (so it measures the mixed maps), before compile and prepare
    tracker = FilterNormTracker(model, every=cfg.track_filters_every) if cfg.track_filters else None
    train_loader, eval_loader = make_loaders(cfg, train_set, eval_set, accelerator.num_processes)
    check_norm_batch(model, per_device_batch(cfg, accelerator.num_processes))
    optimizer = make_optimizer(cfg, model)
    backend = compile_backend(cfg.torchcompile)
    if backend:     # after the mixer's and tracker's hooks, which decide how (catchup/compile.py)
        accelerator.print(f"torch.compile ({backend}): {compile_model(model, backend, mixer)}")
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # Accelerate also steps at the end of the loader, after a partial accumulation
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.model_ema_decay) if cfg.model_ema else None
    progress = TrainProgress()
    parts = {"progress": progress, "mixer": mixer, **({"ema": ema} if ema is not None else {})}
    checkpointer = Checkpointer(accelerator, output, parts, cfg.checkpoint_keep,
                                after_write=(lambda: tracker.records and tracker.save(output / FILTER_NORMS))
                                if tracker is not None else None)
    check_free_space(output, checkpointer.estimated_bytes(model, optimizer), cfg.checkpoint_keep, args.overwrite)
    if args.resume and (candidates := resume_candidates(output, args.resume)):
        checkpointer.choose(candidates, model, optimizer)     # no intact checkpoint: refused before any write
    with _claim_output(accelerator, cfg, args):        # the first write into the run folder
        candidates = resume_candidates(output, args.resume) if args.resume else []
        if args.resume:
            if candidates:
                resume_from = checkpointer.load(candidates, model, optimizer, scheduler, warn=accelerator.print)
                accelerator.print(f"resumed from {resume_from} at epoch {progress.epoch}, "
                                  f"step {progress.global_step}")
            else:
                accelerator.print(f"{output} stopped before its first checkpoint: starting it again from step 0")
            if tracker is not None and (output / FILTER_NORMS).exists():
                tracker.load(output / FILTER_NORMS)
            if main_process:
                record_resume(cfg, output / "config.yaml", changes, progress.global_step)
        if main_process and not (output / "config.yaml").exists():    # a new run, or resumed from a foreign PATH
            dump_config(cfg, output / "config.yaml")
            save_data_info(output, info, class_names(train_set))

        started = provenance.collect(accelerator.device, accelerator.num_processes) if main_process else {}
        if main_process:
            provenance.record_attempt(output, started)

        # tracking
        if wandb_mode != "disabled":
            os.environ["WANDB_MODE"] = wandb_mode
            run_id = _wandb_run_id(output) if main_process else ""
            accelerator.init_trackers(cfg.wandb_project, config={**config_to_dict(cfg), "provenance": started},
                                      init_kwargs={"wandb": wandb_init_kwargs(cfg, output, run_id)})
        accelerator.print(f"{cfg.model} on {cfg.dataset} with mix={cfg.mix}: "
                          f"{accelerator.num_processes} process(es), device {accelerator.device}, "
                          f"mixed precision {accelerator.mixed_precision}, {steps_per_epoch} steps/epoch, "
                          f"output {output}")

        def log(values: dict, step: int) -> None:
            if wandb_mode != "disabled":
                accelerator.log(values, step=step)

        options = StepOptions(clip_grad=cfg.clip_grad, channels_last=cfg.channels_last, log_every=cfg.log_every,
                              max_steps=cfg.max_steps, checkpoint_every_steps=cfg.checkpoint_every_steps)
        criterion = make_criterion(cfg)
        stop = StopOnSignal(accelerator, every=cfg.log_every).install()
        try:
            while progress.epoch < cfg.epochs and not _reached(cfg.max_steps, progress):
                epoch = progress.epoch
                mixer.enabled = not (cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch)
                train_loader.set_epoch(epoch)
                train_loader.dataset.set_epoch(epoch)
                loader = train_loader
                if progress.step_in_epoch:
                    loader = accelerator.skip_first_batches(train_loader,
                                                            progress.step_in_epoch * cfg.grad_accum_steps)
                stats, stopped = train_one_epoch(model, loader, mixer, criterion, optimizer, scheduler, accelerator,
                                                 progress, options, ema=ema, log=log, checkpoint=checkpointer,
                                                 batches_per_epoch=len(train_loader), tracker=tracker, stop=stop)
                if stopped:      # by max_steps, inside the epoch
                    checkpointer.save()
                    break
                row = {"epoch": epoch, "step": progress.global_step, "lr": optimizer.param_groups[0]["lr"], **stats}
                if eval_due(epoch, cfg.epochs, cfg.eval_every, cfg.eval_last):
                    # a failing evaluation (a damaged validation image) must not cost the epoch's training: a
                    # resume from here skips the epoch's batches and evaluates again
                    checkpointer.save()
                    row.update({f"eval_{k}": v for k, v in evaluate(model, eval_loader, accelerator,
                                                                     cfg.channels_last).items()})
                    if ema is not None:
                        row.update({f"ema_{k}": v for k, v in evaluate(ema.module, eval_loader, accelerator,
                                                                        cfg.channels_last).items()})
                progress.history.append(row)
                progress.next_epoch()
                log({("epoch" if k == "epoch" else f"epoch/{k}"): v for k, v in row.items()}, progress.global_step)
                accelerator.print(_epoch_line(row))
                if main_process:
                    _write_summary(output, progress.history)
                checkpointer.save()
            if cfg.wandb_log_model and wandb_mode != "disabled" and main_process:
                wandb_run = accelerator.get_tracker("wandb", unwrap=True)
                log_model_artifact(wandb_run, accelerator.unwrap_model(model), cfg, info)
        finally:
            stop.restore()
            accelerator.end_training()
        if main_process:
            save_weights(accelerator.unwrap_model(model), output / "model.safetensors")
            if ema is not None:
                save_weights(ema.module, output / "model_ema.safetensors")
            results = {**summarize_top1(progress.history), "epochs_done": progress.epoch,
                       "steps": progress.global_step, "provenance": provenance.for_results(output, started)}
            (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            accelerator.print(f"done: {json.dumps(results)}; weights in {output / 'model.safetensors'}")


def _claim_output(accelerator, cfg: TrainConfig, args: argparse.Namespace):
    """Process 0 takes the run folder's lock (held until the run ends); every process learns whether to go on."""
    from contextlib import nullcontext

    from accelerate.utils import broadcast_object_list

    from catchup.errors import CatchupError
    from catchup.rundir import claim_output
    lock, refusal = nullcontext(), [None]
    if accelerator.is_main_process:
        try:
            lock = claim_output(cfg, args.resume, args.overwrite)
        except CatchupError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise CatchupError(refusal[0])
    return lock


FILTER_NORMS = "filter_norms.npz"


def _reached(max_steps: int, progress: TrainProgress) -> bool:
    return bool(max_steps) and progress.global_step >= max_steps


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"{row['images_per_s']:.0f} img/s"]
    if "eval_top1" in row:
        parts.append(f"top-1 {row['eval_top1']:.2f}%")
    if "ema_top1" in row:
        parts.append(f"EMA top-1 {row['ema_top1']:.2f}%")
    return " | ".join(parts)


def _write_summary(output: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    tmp = output / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, output / "summary.csv")


def _wandb_run_id(output: Path) -> str:
    """The W&B run id is kept in the output folder so a resumed run continues the same W&B run."""
    path = output / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: the last complete checkpoint is kept; continue with --resume")
