"""FilterNormTracker: its step-time overhead, and a Figure 1b recording on the quickstart recipe.

    python benchmarks/filter_tracker.py overhead [--model resnet18 --input-size 32 --batch-size 64 --repeats 15]
    python benchmarks/filter_tracker.py record --output /tmp/filter_norms [--epochs 10 --every 20 --mix none catchup]

``overhead`` times one SGD step with no tracker, on a quiet step of a tracker, and on a tracked step
(round-robin repetitions; wall time and this process's CPU time, the latter less sensitive to other load).
``record`` trains the quickstart recipe (digits, no download) once per mixing method with a tracker, saves
each run's ``filter_norms.npz`` and plots them side by side (docs/images/filter_norms.png: --every 11, then
``python -m catchup.analysis filters`` on the two files).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):   # runnable as a script from any directory
    if _path not in sys.path:
        sys.path.insert(0, _path)

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import catchup.models  # noqa: E402,F401  (registers the CIFAR models with timm)
from catchup.cli import run_cli  # noqa: E402
from _timing import interleaved_times, load_average, median  # noqa: E402
from catchup.analysis.filters import FilterNormTracker, load_filter_norms, plot_norm_vs_grad  # noqa: E402
from catchup.config import load_config  # noqa: E402
from catchup.data import build_datasets  # noqa: E402
from catchup.recipe import make_criterion, make_mixer, make_optimizer, make_scheduler  # noqa: E402
from catchup.runs import build_model  # noqa: E402


def overhead(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=100).to(device).train()
    models = {"no tracker": base, "quiet step": copy.deepcopy(base), "tracked step": copy.deepcopy(base)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    trackers = {k: FilterNormTracker(models[k], every=2) for k in ("quiet step", "tracked step")}
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)

    def step(name: str, global_step: int | None):
        def run() -> None:
            if global_step is not None:
                trackers[name].begin_step(global_step)
            nn.functional.cross_entropy(models[name](x), y).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if global_step is not None:
                trackers[name].end_step()
        return run

    fns = {"no tracker": step("no tracker", None), "quiet step": step("quiet step", 1),
           "tracked step": step("tracked step", 0)}
    interleaved_times(fns, args.warmup, device)
    times = interleaved_times(fns, args.repeats, device)
    print(f"{args.model}, {args.input_size} px, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, load {load_average()}; median of {args.repeats} steps")
    ref = [median([t[k] for t in times["no tracker"]]) for k in (0, 1)]
    for name, values in times.items():
        wall, cpu = (median([t[k] for t in values]) for k in (0, 1))
        print(f"{name:>13}: wall {1e3 * wall:8.1f} ms ({wall / ref[0]:.3f}x)   "
              f"process CPU {1e3 * cpu:8.1f} ms ({cpu / ref[1]:.3f}x)")
    print(f"stages tracked: {', '.join(trackers['tracked step'].stages)}")


def record(args: argparse.Namespace) -> None:
    out = Path(args.output)
    series = {}
    for mix in args.mix:
        cfg = load_config(args.config, {"mix": mix, "epochs": args.epochs, "seed": args.seed})
        torch.manual_seed(cfg.seed)
        train_set, _, info = build_datasets(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        model = build_model(cfg, info).train()
        mixer = make_mixer(cfg, model, info, 0)
        tracker = FilterNormTracker(model, every=args.every)        # after the mixer: sees mixed maps
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed))
        optimizer, criterion = make_optimizer(cfg, model), make_criterion(cfg)
        scheduler = make_scheduler(cfg, optimizer, len(loader))
        step = 0
        for epoch in range(cfg.epochs):
            for x, y in loader:
                tracker.begin_step(step)
                x, soft = mixer(x, y)
                criterion(model(x), soft).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.end_step()
                step += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=step)
            print(f"{mix}: epoch {epoch + 1}/{cfg.epochs} done, {len(tracker.records)} steps recorded")
        path = tracker.save(out / mix / "filter_norms.npz")
        print(f"wrote {path}")
        series[mix] = load_filter_norms(path)
    fig = plot_norm_vs_grad(series, steps=args.steps, stages=args.stage)
    fig.savefig(out / "filter_norms.png")
    print(f"wrote {out / 'filter_norms.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead")
    over.add_argument("--model", default="resnet18")
    over.add_argument("--input-size", type=int, default=32)
    over.add_argument("--batch-size", type=int, default=64)
    over.add_argument("--repeats", type=int, default=15)
    over.add_argument("--warmup", type=int, default=3)
    over.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    over.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    rec = commands.add_parser("record")
    rec.add_argument("--output", required=True)
    rec.add_argument("--config", default=str(_HERE.parent / "configs" / "quickstart.yaml"))
    rec.add_argument("--mix", nargs="+", default=["none", "catchup"])
    rec.add_argument("--epochs", type=int, default=10)
    rec.add_argument("--every", type=int, default=20, help="record every N optimizer steps")
    rec.add_argument("--steps", type=int, default=3, help="recorded steps drawn per run")
    rec.add_argument("--stage", nargs="+", default=None, help="stages drawn (default: all)")
    rec.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    (overhead if args.command == "overhead" else record)(args)


if __name__ == "__main__":
    run_cli(main)
