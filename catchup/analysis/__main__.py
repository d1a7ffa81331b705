"""Analysis of trained runs: activation maps (Figure 1a), filter-norm plots (Figure 1b), loss landscapes (Figure 3).

    python -m catchup.analysis activations --run runs/quickstart [--images 6] [--stage stages.2] [--weights ema]
    python -m catchup.analysis landscape --run runs/a --run runs/b [--batches 4] [--steps 21] [--range 1.0]
                                         [--directions hessian|random]
    python -m catchup.analysis filters --npz runs/a/filter_norms.npz [--npz runs/b/filter_norms.npz] [--steps 3]
                                       [--labels A B] [--linear]

Outputs go to <first run>/analysis/ unless --output names a folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from catchup.cli import ArgumentParser, run_cli
from catchup.errors import CatchupError
from catchup.rundir import check_writable

# torch and the plotting stack load after the arguments are checked, so a mistake is reported in a second
if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from catchup.runs import LoadedRun

DIRECTIONS = ("hessian", "random")     # as in catchup.analysis.landscape, which refuses any other


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m catchup.analysis", description=__doc__.splitlines()[0],
                            allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser, many: bool) -> None:
        p.add_argument("--run", required=True, action="append" if many else "store", type=os.path.expanduser,
                       help="run folder written by train.py" + (" (repeat to compare runs)" if many else ""))
        p.add_argument("--weights", choices=("final", "ema"), default="final")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        p.add_argument("--data-dir", default=None, type=os.path.expanduser, help="override the recipe's data_dir")
        p.add_argument("--output", default=None, type=os.path.expanduser,
                       help="output folder (default: <run>/analysis)")
        p.add_argument("--seed", type=int, default=0, help="which images/batches and random vectors")

    act = commands.add_parser("activations", help="Figure 1a: input, saliency, strongest and weakest filters")
    run_options(act, many=False)
    act.add_argument("--images", type=int, default=6, help="rows: eval images")
    act.add_argument("--stage", default=None, help="module name (default: second-to-last feature stage)")
    act.add_argument("--topk", type=int, default=4, help="filters shown from each end of the norm ranking")

    land = commands.add_parser("landscape", help="Figure 3: loss along the top Hessian eigenvectors")
    run_options(land, many=True)
    land.add_argument("--batches", type=int, default=4, help="training batches (eval transform) for the loss")
    land.add_argument("--batch-size", type=int, default=None, help="default: the recipe's batch_size")
    land.add_argument("--steps", type=int, default=21, help="grid points per axis")
    land.add_argument("--range", type=float, default=1.0, dest="span", help="grid spans [-range, range]")
    land.add_argument("--directions", choices=DIRECTIONS, default="hessian")
    land.add_argument("--iters", type=int, default=50, help="power-iteration steps per eigenvector")
    land.add_argument("--tol", type=float, default=1e-3, help="relative eigenvalue tolerance")
    land.add_argument("--no-2d", action="store_true", help="only the 1-D curves (a grid costs steps^2 losses)")

    filt = commands.add_parser("filters", help="Figure 1b: activation norm vs gradient norm from tracker files")
    filt.add_argument("--npz", required=True, action="append", type=os.path.expanduser,
                      help="FilterNormTracker.save() output (repeatable)")
    filt.add_argument("--labels", nargs="+", default=None, help="one label per --npz (default: parent folder)")
    filt.add_argument("--steps", type=int, default=3, help="recorded steps shown per file, spread evenly")
    filt.add_argument("--stage", action="append", default=None, help="stages to show (default: all)")
    filt.add_argument("--linear", action="store_true", help="linear gradient-norm axis (default: log)")
    filt.add_argument("--output", default=None, type=os.path.expanduser,
                      help="output folder (default: the first file's folder)")
    return parser.parse_args(argv)


def _output_dir(args: argparse.Namespace, run: str | Path) -> Path:
    out = Path(args.output) if args.output else Path(run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


_AT_LEAST = {"images": 1, "topk": 1, "batches": 1, "batch_size": 1, "steps": 1, "iters": 1}


def check_args(args: argparse.Namespace) -> None:
    """Every argument mistake, before torch loads and before any model runs."""
    for name, low in (*_AT_LEAST.items(), *((("steps", 2),) if args.command == "landscape" else ())):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise CatchupError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name in ("span", "tol"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value < float("inf"):     # NaN fails both
            raise CatchupError(f"--{'range' if name == 'span' else name} must be a finite number > 0, got {value}")
    if args.command == "filters":
        for path in args.npz:
            if not Path(path).is_file():
                raise CatchupError(f"no such filter-norm file: {path}")
        check_writable(Path(args.output) if args.output else Path(args.npz[0]).parent)
        return
    runs = args.run if isinstance(args.run, list) else [args.run]
    for run in runs:
        if not Path(run).is_dir():
            raise CatchupError(f"no such run folder: {run}")
    check_writable(Path(args.output) if args.output else Path(runs[0]) / "analysis")
    args.device = _device(args.device)


def _device(name: str | None) -> str:
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CatchupError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CatchupError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                           "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CatchupError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CatchupError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    print(f"wrote {path}")
    return path


def cmd_activations(args: argparse.Namespace) -> None:
    from catchup.analysis.activations import activation_figure, default_stage, pick_images
    from catchup.data import build_datasets
    from catchup.runs import load_run
    run = load_run(args.run, args.weights, args.device, args.data_dir)
    _, eval_set, info = build_datasets(run.cfg.dataset, run.cfg.data_dir, input_size=run.cfg.input_size,
                                       train_transform=False)
    x, y = pick_images(eval_set, args.images, args.seed)
    stage = args.stage or default_stage(run.model)
    fig = activation_figure(run.model, x, y, info.mean, info.std, stage, args.topk)
    _save(fig, _output_dir(args, args.run) / "activations.png")


def _landscape_batches(run: LoadedRun, count: int, batch_size: int, seed: int) -> list[tuple]:
    from catchup.analysis.activations import pick_images
    from catchup.data import build_datasets
    train_set, _, _ = build_datasets(run.cfg.dataset, run.cfg.data_dir, input_size=run.cfg.input_size,
                                     train_transform=False)
    x, y = pick_images(train_set, min(count * batch_size, len(train_set)), seed)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _labels(runs: Sequence[str]) -> list[str]:
    names = [Path(r).name for r in runs]
    return names if len(set(names)) == len(names) else [str(Path(r)) for r in runs]


def cmd_landscape(args: argparse.Namespace) -> None:
    import numpy as np
    from torch import nn

    from catchup.analysis.landscape import landscape, plot_landscapes, plot_surfaces
    from catchup.runs import load_run
    results: dict[str, dict[str, np.ndarray]] = {}
    loss_fn = nn.CrossEntropyLoss()
    for label, run_dir in zip(_labels(args.run), args.run):
        run = load_run(run_dir, args.weights, args.device, args.data_dir)
        batches = _landscape_batches(run, args.batches, args.batch_size or run.cfg.batch_size, args.seed)
        print(f"{label}: {run.cfg.model} trained with mix={run.cfg.mix}, "
              f"{sum(len(b[1]) for b in batches)} training images")
        results[label] = landscape(run.model, loss_fn, batches, steps=args.steps, span=args.span,
                                   directions=args.directions, iters=args.iters, tol=args.tol, seed=args.seed,
                                   grid_2d=not args.no_2d)
        eig = results[label]["eigenvalues"]
        print(f"{label}: loss {float(results[label]['loss']):.4f}" +
              (f", top Hessian eigenvalues {eig[0]:.4g}, {eig[1]:.4g}" if np.isfinite(eig).all() else ""))
    out = _output_dir(args, args.run[0])
    arrays = {"labels": np.array(list(results)), "directions": np.array(args.directions)}
    for label, r in results.items():
        arrays.update({f"{label}/{k}": v for k, v in r.items()})
    np.savez(out / "landscape.npz", **arrays)
    print(f"wrote {out / 'landscape.npz'}")
    _save(plot_landscapes(results, args.directions), out / "landscape.png")
    if not args.no_2d:
        _save(plot_surfaces(results), out / "landscape_surface.png")


def cmd_filters(args: argparse.Namespace) -> None:
    from catchup.analysis.filters import load_filter_norms, plot_norm_vs_grad
    labels = args.labels or _labels([str(Path(p).parent) for p in args.npz])
    if len(labels) != len(args.npz):
        raise CatchupError(f"--labels gives {len(labels)} names for {len(args.npz)} --npz files")
    series = {label: load_filter_norms(path) for label, path in zip(labels, args.npz)}
    out = Path(args.output) if args.output else Path(args.npz[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_norm_vs_grad(series, steps=args.steps, stages=args.stage, log_grad=not args.linear)
    _save(fig, out / "filter_norms.png")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        {"activations": cmd_activations, "landscape": cmd_landscape, "filters": cmd_filters}[args.command](args)
    except CatchupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
