"""One training epoch and one evaluation pass, on an Accelerator. Knows nothing of recipes or W&B."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from catchup.compile import PaddedEval, is_compiled
from catchup.errors import CatchupError
from catchup.mix import Mixer
from catchup.robustness import classification_metrics, evaluate_logits
from catchup.stopping import Stopped


@dataclass
class TrainProgress:
    """Where the run is; checkpointed with the run so a resume continues at the same step."""
    epoch: int = 0                # current epoch (0-based)
    step_in_epoch: int = 0        # optimizer steps already done in this epoch
    global_step: int = 0          # optimizer steps since the start
    history: list = field(default_factory=list)   # per-epoch summary rows
    # the current epoch's running statistics up to the last checkpoint, so a resumed epoch reports all its steps:
    # loss_sum (mean over processes), micro (batches), seen (images per process), seconds, layers {layer: batches}
    epoch_stats: dict = field(default_factory=dict)

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_stats = self.epoch + 1, 0, {}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Checkpointer(Protocol):
    """What the epoch needs of the run's checkpoints (catchup.resume.Checkpointer): write one of this step."""
    def save(self) -> Any: ...


@dataclass
class StepOptions:
    clip_grad: float | None = None
    channels_last: bool = False
    log_every: int = 10
    max_steps: int = 0                     # 0 = no limit
    checkpoint_every_steps: int = 0        # 0 = only at epoch ends


class NonFiniteLoss(CatchupError):
    pass


def train_one_epoch(model: nn.Module, loader, mixer: Mixer, criterion: Callable, optimizer, scheduler,
                    accelerator: Accelerator, progress: TrainProgress, options: StepOptions,
                    ema: nn.Module | None = None, log: Callable[[dict, int], None] | None = None,
                    checkpoint: Checkpointer | None = None, batches_per_epoch: int | None = None,
                    tracker=None, stop=None) -> tuple[dict[str, float], bool]:
    """Train until the loader is exhausted (or ``max_steps``); returns the epoch's mean loss and throughput,
    and whether ``max_steps`` stopped it before the end of the loader.

    With gradient accumulation the epoch has ceil(micro-batches / accumulation) optimizer steps: Accelerate
    also steps after the last, partial accumulation.

    The loss is checked for NaN/Inf without a per-step host sync: a device flag is read at each log step and
    before every checkpoint, so a non-finite loss stops the run before it can be saved. ``stop`` (a
    catchup.stopping.StopOnSignal) is asked at each step boundary; when it requests a stop, a checkpoint is
    written and ``Stopped`` raised.
    """
    model.train()
    device = accelerator.device
    stats = progress.epoch_stats
    for key in ("loss_sum", "micro", "seen", "seconds"):
        stats.setdefault(key, 0)
    layer_counts: dict[int, int] = stats.setdefault("layers", {})
    total_loss = torch.zeros((), device=device)     # since the last fold into ``stats``
    bad = torch.zeros((), dtype=torch.bool, device=device)
    seen, micro, start = 0, 0, time.perf_counter()

    def fold() -> None:
        """Move the running sums into the checkpointed ``progress.epoch_stats`` (one host sync)."""
        nonlocal seen, micro, start
        now = time.perf_counter()
        stats["loss_sum"] += float(accelerator.reduce(total_loss.clone(), "mean").item())
        stats["micro"] += micro
        stats["seen"] += seen
        stats["seconds"] += now - start
        total_loss.zero_()
        seen, micro, start = 0, 0, now

    def save() -> None:
        _check_finite(bad, progress)
        fold()
        if checkpoint is not None:
            checkpoint.save()

    total = batches_per_epoch or len(loader)
    stopped = False
    bar = tqdm(total=math.ceil(total / accelerator.gradient_accumulation_steps), initial=progress.step_in_epoch,
               desc=f"epoch {progress.epoch}", disable=not accelerator.is_main_process, dynamic_ncols=True,
               leave=False)
    for x, y in loader:
        if options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            if tracker is not None:        # the filter-norm tracker (track_filters), off on most steps
                tracker.begin_step(progress.global_step)
            x, soft = mixer(x, y)
            plan = mixer.last_plan
            out = model(x)
            loss = criterion(out, soft)
            aux = mixer.auxiliary_loss(out)
            if aux is not None:
                loss = loss + aux
            accelerator.backward(loss)
            if accelerator.sync_gradients and options.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), options.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        layer = plan.layer if plan is not None else -1     # -1: this batch was not mixed
        layer_counts[layer] = layer_counts.get(layer, 0) + 1
        detached = loss.detach()
        bad |= ~torch.isfinite(detached)
        total_loss += detached
        seen += x.shape[0]
        micro += 1
        if not accelerator.sync_gradients:
            continue
        progress.step_in_epoch += 1
        progress.global_step += 1
        record = tracker.end_step() if tracker is not None else None
        if record is not None and log is not None and accelerator.is_main_process:
            log(tracker.wandb_payload(record), progress.global_step)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=progress.global_step)
        if scheduler is not None:
            scheduler.step_update(num_updates=progress.global_step)
        bar.update(1)
        if progress.global_step % options.log_every == 0:
            _check_finite(bad, progress)
            loss_value = detached.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if log is not None:
                elapsed = time.perf_counter() - start
                log({"train/loss": loss_value, "train/lr": optimizer.param_groups[0]["lr"],
                     "train/images_per_s": seen * accelerator.num_processes / max(elapsed, 1e-9),
                     "mix/layer": layer, "mix/lam_eff": plan.lam_eff if plan is not None else 1.0},
                    progress.global_step)
        if stop is not None and stop.requested(progress.global_step):
            save()
            bar.close()
            raise Stopped(stop.message(progress.global_step))
        if checkpoint is not None and options.checkpoint_every_steps and \
                progress.global_step % options.checkpoint_every_steps == 0:
            save()
        if options.max_steps and progress.global_step >= options.max_steps:
            stopped = not accelerator.gradient_state.end_of_dataloader
            break
    bar.close()
    _check_finite(bad, progress)
    fold()
    steps = max(stats["micro"], 1)
    elapsed = stats["seconds"]
    result = {"train_loss": stats["loss_sum"] / steps,
              "images_per_s": stats["seen"] * accelerator.num_processes / max(elapsed, 1e-9), "epoch_time_s": elapsed}
    for layer, count in sorted(layer_counts.items()):
        result[f"mix_layer_share/{layer}"] = count / steps
    return result, stopped


def _check_finite(bad: torch.Tensor, progress: TrainProgress) -> None:
    if bool(bad.item()):
        raise NonFiniteLoss(f"the training loss became NaN or Inf at step {progress.global_step} "
                            f"(epoch {progress.epoch}); stopped without saving, the last checkpoint is kept")


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, channels_last: bool = False) -> dict[str, float]:
    """Top-1, top-5, NLL and ECE over the whole eval set, each sample counted once across processes."""
    transform = (lambda x, y: x.contiguous(memory_format=torch.channels_last)) if channels_last else None
    if is_compiled(model):    # static shapes: the last, smaller batch is padded rather than recompiled for
        model = PaddedEval(model)
    logits, targets = evaluate_logits(model, _with_bar(loader, accelerator), accelerator.device,
                                      transform_batch=transform, gather=accelerator.gather_for_metrics)
    metrics = classification_metrics(logits.float(), targets)
    return {"top1": metrics.top1, "top5": metrics.top5, "loss": metrics.nll, "ece": metrics.ece, "n": metrics.n}


def _with_bar(loader, accelerator: Accelerator):
    return tqdm(loader, desc="eval", disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True)


def eval_due(epoch: int, epochs: int, every: int, last: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with an evaluation: every ``every`` epochs, each of the last ``last``
    and always the final one."""
    return (epoch + 1) % every == 0 or epoch + 1 > epochs - last or epoch + 1 == epochs


def summarize_top1(history: list[dict]) -> dict[str, float]:
    """Best, last and median-of-last-10 eval top-1: peers report each, so all three are written.

    Only evaluated epochs count: ``best_top1`` is the best evaluation, and the median is over the evaluations
    within the last 10 epochs run (``median_last10_evals`` of them), so that a sparse schedule does not pass off
    an evaluation from mid-run as one of the last 10 epochs.
    """
    rows = [row for row in history if "eval_top1" in row and not math.isnan(row["eval_top1"])]
    if not rows:
        return {}
    values = [row["eval_top1"] for row in rows]
    final = history[-1]["epoch"]
    tail = sorted(row["eval_top1"] for row in rows if row["epoch"] > final - 10)
    out = {"best_top1": max(values), "last_top1": values[-1], "evaluations": len(values),
           "median_last10_evals": len(tail)}
    if tail:
        mid = len(tail) // 2
        out["median_last10_top1"] = tail[mid] if len(tail) % 2 else (tail[mid - 1] + tail[mid]) / 2
    return out
