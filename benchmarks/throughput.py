"""Images/s of catchup's training step (engine.train_one_epoch on an Accelerator, no mixing) against a bare
PyTorch loop doing the same model, optimizer, precision and memory format: the ceiling for framework overhead.

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --model resnet50 --input-size 224 --batch-size 128 --channels-last  # on a GPU
    accelerate launch --mixed_precision bf16 benchmarks/throughput.py ...                               # with AMP

Both loops run in this one process, alternating epochs (bare, ours, bare, ours, ...), on the same in-memory
synthetic data; the reported ratio is median(ours) / median(bare) images/s (target >= 0.97).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import catchup.models  # noqa: E402,F401
from catchup.cli import run_cli  # noqa: E402
from catchup.engine import StepOptions, TrainProgress, train_one_epoch  # noqa: E402
from catchup.mix import build_mixer  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per loop")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--quick", action="store_true", help="small settings that finish in about a minute on 2 CPUs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 8, 3
    return args


def bare_epoch(model, loader, optimizer, accelerator: Accelerator, channels_last: bool) -> float:
    """The plain loop: forward under the same autocast, cross-entropy, backward, step."""
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += x.shape[0]
    _sync(accelerator)
    return seen / (time.perf_counter() - start)


def _sync(accelerator: Accelerator) -> None:
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator()
    torch.manual_seed(0)
    n = args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, 3, args.input_size, args.input_size),
                         torch.randint(0, args.num_classes, (n,)))

    def fresh():
        model = timm.create_model(args.model, num_classes=args.num_classes)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    bare_model, bare_opt = fresh()
    bare_model = bare_model.to(accelerator.device)
    bare_loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                             pin_memory=accelerator.device.type == "cuda")
    ours_model, ours_opt = fresh()
    mixer = build_mixer("none", ours_model, num_classes=args.num_classes)
    ours_model, ours_opt, ours_loader = accelerator.prepare(
        ours_model, ours_opt, DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True))
    progress, options = TrainProgress(), StepOptions(channels_last=args.channels_last, log_every=10**9)
    criterion = SoftTargetCrossEntropy()

    def ours_epoch() -> float:
        progress.step_in_epoch = 0
        stats, _ = train_one_epoch(ours_model, ours_loader, mixer, criterion, ours_opt, None, accelerator, progress,
                                options)
        _sync(accelerator)
        return stats["images_per_s"]

    bare_epoch(bare_model, bare_loader, bare_opt, accelerator, args.channels_last)   # warm-up both
    ours_epoch()
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_epoch(bare_model, bare_loader, bare_opt, accelerator, args.channels_last))
        ours.append(ours_epoch())
    result = {"bare_images_per_s": statistics.median(bare), "ours_images_per_s": statistics.median(ours),
              "bare_all": bare, "ours_all": ours}
    result["ratio"] = result["ours_images_per_s"] / result["bare_images_per_s"]
    result["_meta"] = {"model": args.model, "batch_size": args.batch_size, "input_size": args.input_size,
                       "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
                       "channels_last": args.channels_last, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "repeats": args.repeats, "steps": args.steps}
    print(f"{args.model} {args.input_size}px batch {args.batch_size} on {accelerator.device} "
          f"({accelerator.mixed_precision}): bare {result['bare_images_per_s']:.1f} img/s, "
          f"catchup engine {result['ours_images_per_s']:.1f} img/s, ratio {result['ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
