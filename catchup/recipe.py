"""From a recipe to the objects train.py wires together: accelerator, loaders, optimizer, scheduler, loss, mixer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from catchup.config import TrainConfig
from catchup.wandb_mode import resolve_wandb_mode  # noqa: F401  (re-exported)
from catchup.errors import CatchupError
from catchup.data import DataInfo, build_datasets
from catchup.data.augment import Augment
from catchup.data.sampling import EpochSeeded, RepeatedAugmentation, SeededStream
from catchup.mix import Mixer, build_mixer, mixer_options


def make_accelerator(cfg: TrainConfig, wandb_mode: str) -> Accelerator:
    """Mixed precision comes from `accelerate launch --mixed_precision`; the sampler is seedable for exact resume."""
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=cfg.output,
        # dispatch_batches=False: every process reads its own data. Accelerate's default for iterable datasets
        # (True) has process 0 read everything and drops the loader's generator that seeds the shard streams.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  dispatch_batches=False),
        step_scheduler_with_optimizer=False)


def per_device_batch(cfg: TrainConfig, num_processes: int) -> int:
    """``batch_size`` is global: split over processes and accumulation steps."""
    parts = num_processes * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise CatchupError(f"batch_size {cfg.batch_size} does not split evenly over {num_processes} processes x "
                           f"{cfg.grad_accum_steps} accumulation steps")
    return cfg.batch_size // parts


def make_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, DataInfo]:
    """The recipe's datasets, with timm's augmentation options for ImageNet-style data."""
    return build_datasets(cfg.dataset, cfg.data_dir, train_fraction=cfg.train_fraction, seed=cfg.seed,
                          download=cfg.download, input_size=cfg.input_size, augment=Augment.from_config(cfg),
                          num_classes=cfg.num_classes, splits=(cfg.train_split, cfg.val_split))


def make_loaders(cfg: TrainConfig, train_set: Dataset, eval_set: Dataset, num_processes: int
                 ) -> tuple[DataLoader, DataLoader]:
    """Loaders to hand to `accelerator.prepare`, which shards them over the processes.

    Map-style training data is shuffled by a RandomSampler (Accelerate swaps in its seedable one) or, with
    `aug_repeats`, by `RepeatedAugmentation`; iterable data (WebDataset shards) streams through `SeededStream`.
    Either way each sample's augmentation is seeded from (seed, epoch, position), so a resumed run continues
    with the same samples and augmentations.
    """
    batch = per_device_batch(cfg, num_processes)
    eval_batch = max(1, (cfg.eval_batch_size or cfg.batch_size) // num_processes)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False)   # workers restart each epoch and pick up the epoch's seed
    if isinstance(train_set, IterableDataset):
        return _stream_loaders(cfg, train_set, eval_set, batch, eval_batch, common)
    # drop_last: a final batch of one sample would break BatchNorm in training.
    # A private generator: the worker base seed drawn at each iter() must not consume the global RNG,
    # whose checkpointed state a resumed run relies on.
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.aug_repeats:
        sampler = RepeatedAugmentation(len(train_set), cfg.aug_repeats, num_processes, batch, seed=cfg.seed)
        order: dict[str, Any] = dict(sampler=sampler)
    else:
        order = dict(shuffle=True)
    train = DataLoader(EpochSeeded(train_set, cfg.seed), batch_size=batch, drop_last=True, generator=generator,
                       **order, **common)
    if len(train) == 0:
        raise CatchupError(f"the training set has {len(train_set)} samples, fewer than one batch of {batch} "
                           "per process; lower batch_size")
    evaluation = DataLoader(eval_set, batch_size=eval_batch, shuffle=False, **common)
    return train, evaluation


def _stream_loaders(cfg: TrainConfig, train_set, eval_set, batch: int, eval_batch: int, common: dict):
    """Loaders over timm's WebDataset reader: its epoch is ceil(samples / (processes x workers)) rounded up to
    whole batches per worker (timm's rule), so every process takes the same number of steps."""
    if cfg.aug_repeats:
        raise CatchupError(f"aug_repeats needs random access to the samples; {cfg.dataset} is read as a stream")
    loaders = []
    for dataset, size in ((train_set, batch), (eval_set, eval_batch)):
        dataset.reader.batch_size = size
        dataset.set_loader_cfg(num_workers=cfg.workers)
        generator = torch.Generator().manual_seed(cfg.seed)
        stream = SeededStream(dataset, dataset.transform, cfg.seed, size, generator)
        loaders.append(DataLoader(stream, batch_size=size, drop_last=dataset is train_set, generator=generator,
                                  **common))
    if len(loaders[0]) == 0:
        raise CatchupError(f"the training shards hold fewer samples than one batch of {batch} per process")
    return loaders[0], loaders[1]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    except (TypeError, ValueError, AssertionError) as err:
        raise CatchupError(f"cannot create optimizer {cfg.opt!r}: {err}") from None


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """A timm scheduler stepped per optimizer update (``step_update``), or None for a constant lr."""
    if cfg.sched == "none":
        return None
    kwargs: dict[str, Any] = dict(sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                  warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, decay_rate=cfg.decay_rate,
                                  step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    if cfg.sched == "multistep":      # no milestones (the default): a constant lr after the warmup
        kwargs["decay_milestones"] = list(cfg.decay_milestones)
    elif cfg.sched == "step":         # validate made sure it has its period
        kwargs["decay_epochs"] = cfg.decay_milestones[0]
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    return scheduler


def make_criterion(cfg: TrainConfig) -> nn.Module:
    """Every mixer returns soft targets (smoothing included), so one loss serves all methods."""
    if cfg.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=cfg.bce_target_thresh)
    return SoftTargetCrossEntropy()


def make_mixer(cfg: TrainConfig, model: nn.Module, info: DataInfo, process_index: int) -> Mixer:
    input_size = (info.in_chans, info.input_size, info.input_size)
    options: dict[str, Any] = dict(cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
                                   label_smoothing=cfg.smoothing, layers=cfg.mix_layers,
                                   layer_weights=cfg.mix_layer_weights, label_lam=cfg.label_lam,
                                   seed=cfg.seed * 1000 + process_index, input_size=input_size)
    if cfg.mix_alpha is not None:
        options["alpha"] = cfg.mix_alpha
    if cfg.mix_prob is not None:
        options["prob"] = cfg.mix_prob
    if {"mean", "std"} <= mixer_options(cfg.mix):    # methods that work in pixel space (PuzzleMix)
        options.update(mean=info.mean, std=info.std)
    options.update(cfg.mix_kwargs)
    return build_mixer(cfg.mix, model, num_classes=cfg.num_classes or info.num_classes, **options)


def wandb_init_kwargs(cfg: TrainConfig, output: Path, run_id: str) -> dict[str, Any]:
    return {"id": run_id, "resume": "allow", "name": cfg.wandb_name or output.name, "entity": cfg.wandb_entity,
            "tags": list(cfg.wandb_tags), "group": cfg.wandb_group, "dir": str(output)}
