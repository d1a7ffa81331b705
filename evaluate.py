"""Evaluate trained runs as the paper does: accuracy and calibration, FGSM, common corruptions, deformations,
OOD detection and filter reliance, as one report (report.json, report.md and PNG plots).

    python evaluate.py --run runs/quickstart                                   # -> runs/quickstart/eval/
    python evaluate.py --run runs/a --run runs/b --output reports/ab --weights both
    accelerate launch evaluate.py --run runs/c100 --suite all --corruption-dir data/CIFAR-100-C --fgsm-eps 4/255,8/255

`all` (the default) runs every suite whose data is at hand: clean, fgsm, deformation and reliance always,
corruption with --corruption-dir, ood with --ood-dir. Only the main process writes; nothing is written into a
run folder except under its eval/. Under torchrun, name the run folders positionally (`evaluate.py runs/a`):
torchrun's own parser takes `--run` for an abbreviation of its `--run-path`.
"""
from __future__ import annotations

import time
from pathlib import Path

from catchup.cli import ArgumentParser, run_cli, user_path
from catchup.errors import CatchupError
from catchup.rundir import check_writable
from catchup.suites import SUITES, parse_eps, select_suites, short_names


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("runs", nargs="*", type=user_path, metavar="RUN", help="run folder(s), same as --run")
    p.add_argument("--run", action="append", type=user_path, default=[], help="run folder (repeat for several)")
    p.add_argument("--weights", choices=("final", "ema", "both"), default="final",
                   help="final weights, the EMA weights (runs trained with model_ema), or both")
    p.add_argument("--suite", default="all", help=f"comma-separated from {', '.join(SUITES)}, or all")
    p.add_argument("--fgsm-eps", default="4/255", help="comma-separated eps in [0, 1] pixel units (4/255,8/255)")
    p.add_argument("--corruption-dir", type=user_path, help="CIFAR-10/100-C (.npy) or Tiny-ImageNet-C folder")
    p.add_argument("--ood-dir", action="append", type=user_path, default=[],
                   help="folder of out-of-distribution images (repeat for several sets)")
    p.add_argument("--ood-classes", type=user_path,
                   help="class list restricting the logits (ImageNet-O: WordNet ids or indices, one a line)")
    p.add_argument("--output", type=user_path, help="report folder (default <run>/eval; required for several runs)")
    p.add_argument("--data-dir", help="dataset folder, when it moved since training")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the random deformations")
    p.add_argument("--deform-draws", type=int, default=5,
                   help="draws of the random rotations and shears; the report gives their mean and std")
    p.add_argument("--deform-centre", choices=("true", "keras"), default="true",
                   help="centre of the deformations: the true image centre, or keras (torchsample's size/2 + 0.5, "
                        "as in the Manifold Mixup protocol)")
    p.add_argument("--wandb", action="store_true", help="also log to each run's W&B run (keys eval/...)")
    args = p.parse_args(argv)
    args.run = args.runs + args.run
    if not args.run:
        p.error("name at least one run folder (--run DIR)")
    return args


def _check_args(args) -> Path:
    """Input errors are found before any model runs; returns the report folder."""
    if len(args.run) > 1 and args.output is None:
        raise CatchupError("several runs give one combined report: pass --output DIR")
    if args.batch_size < 1 or args.workers < 0 or args.deform_draws < 1:
        raise CatchupError("--batch-size and --deform-draws must be >= 1 and --workers >= 0")
    out = (args.output if args.output is not None else args.run[0] / "eval").resolve()
    for folder in (out, *out.parents):
        if (folder / "config.yaml").exists() and folder / "eval" not in (out, *out.parents):
            raise CatchupError(f"--output {out} lies in the run folder {folder}; reports go to its eval/ or elsewhere")
    for run in args.run:
        if not run.is_dir():
            raise CatchupError(f"no such run folder: {run}")
    check_writable(out, "report folder")
    return out


def main(argv=None) -> Path:
    """Evaluate, write the report, return the report folder."""
    args = parse_args(argv)
    out_dir = _check_args(args)
    suites, skipped = select_suites(args.suite, args.corruption_dir, args.ood_dir)
    eps = parse_eps(args.fgsm_eps)
    # torch loads only once the arguments are known to be good
    from accelerate import Accelerator

    from catchup.evaluation import EvalOptions, evaluate_model, load_model, open_run, open_suite_data
    from catchup.report import log_to_wandb, write_report

    options = EvalOptions(suites=suites, fgsm_eps=eps, corruption_dir=args.corruption_dir,
                          ood_dirs=tuple(args.ood_dir), ood_classes=args.ood_classes, batch_size=args.batch_size,
                          workers=args.workers, seed=args.seed, deform_draws=args.deform_draws,
                          deform_centre=args.deform_centre)
    weights = ("final", "ema") if args.weights == "both" else (args.weights,)
    runs = [open_run(d, args.data_dir) for d in args.run]
    # every model and test set is opened up front, so a bad file stops the script before hours of work
    data = [open_suite_data(run, options) for run in runs]
    jobs = [(run, run_data, label, w, load_model(run, w))
            for run, run_data, label in zip(runs, data, short_names(args.run)) for w in weights]

    accelerator = Accelerator()
    results = []
    started = time.time()
    try:
        for run, run_data, label, w, model in jobs:
            accelerator.print(f"evaluating {label} ({w} weights): {', '.join(suites)}")
            result = evaluate_model(model, run, run_data, w, options, accelerator)
            result.numbers = {"label": label, **result.numbers}
            results.append(result)
        if accelerator.is_main_process:
            meta = {"suites": list(suites), "skipped": skipped, "weights": list(weights),
                    "fgsm_eps": dict(options.fgsm_eps) if "fgsm" in suites else {},
                    "corruption_dir": str(args.corruption_dir) if args.corruption_dir else None,
                    "ood_dirs": [str(d) for d in args.ood_dir], "ood_classes": str(args.ood_classes or "") or None,
                    "seed": args.seed, "deform_draws": args.deform_draws, "deform_centre": args.deform_centre,
                    "batch_size": args.batch_size, "num_processes": accelerator.num_processes,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 1)}
            plots = write_report(results, meta, out_dir)
            _print_summary([r.numbers for r in results], list(meta["fgsm_eps"]))
            print(f"report: {out_dir / 'report.md'} ({len(plots)} plots)")
            if args.wandb:
                log_to_wandb(results, plots, {str(r.run_dir): r.cfg for r in runs}, out_dir)
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
    return out_dir


def _print_summary(rows: list[dict], eps_labels: list[str]) -> None:
    from catchup.report import summary_columns
    for row in rows:
        cells = [f"{h} {v:.2f}" for h, get in summary_columns([row], eps_labels)[2:]
                 if isinstance(v := get(row), float)]
        print(f"{row['label']} ({row['weights']}): " + ", ".join(cells))


if __name__ == "__main__":
    run_cli(main)
