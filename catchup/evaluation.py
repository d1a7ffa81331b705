"""The paper's evaluation of trained runs on an Accelerator: clean accuracy and calibration, FGSM, common
corruptions, deformations, OOD detection and filter reliance.

Every metric gathers its per-sample values with `accelerator.gather_for_metrics`, so a multi-process run
counts each test image exactly once and reports what one process would.
"""
from __future__ import annotations

import bisect
import pickle
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from catchup.config import TrainConfig, load_config
from catchup.data import DataInfo, ImageList, build_datasets, build_eval_transform, dataset_labels
from catchup.data.augment import Augment
from catchup.data.transforms import FIXED_FAMILIES
from catchup.errors import CatchupError
from catchup.robustness import (
    DEFORMATIONS, CifarCorrupted, TinyImageNetCorrupted, available_corruptions, classification_metrics,
    corruption_summary, evaluate_logits, feature_drop_curve, feature_mass_share, fgsm_error,
    max_softmax_score, ood_metrics, pooled_features, read_class_indices, restrict_logits, warp_batch,
)
from catchup.robustness.corruptions import SEVERITIES
from catchup.robustness.deformations import sample_matrices
from catchup.runs import WEIGHTS, build_model, class_names, load_class_names, load_data_info, load_weights
from catchup.suites import SUITES, parse_eps, select_suites, short_names  # noqa: F401  (re-exported)

MASS_SHARES: tuple[float, ...] = (0.5, 0.9)


@dataclass
class EvalOptions:
    suites: tuple[str, ...] = ("clean", "fgsm", "deformation", "reliance")
    fgsm_eps: tuple[tuple[str, float], ...] = (("4/255", 4 / 255),)  # (label as typed, value in [0, 1] pixels)
    corruption_dir: Path | None = None
    ood_dirs: tuple[Path, ...] = ()
    ood_classes: Path | None = None
    batch_size: int = 128  # per process
    workers: int = 0
    seed: int = 0
    reliance_steps: int = 20
    deform_draws: int = 5  # independent draws of the random rotations and shears (mean and std reported)
    deform_centre: str = "true"  # "true" image centre or "keras" (torchsample's size/2 + 0.5)


@dataclass
class RunData:
    """A run folder's recipe and data, built once and shared by its final and EMA weights."""
    run_dir: Path
    cfg: TrainConfig
    info: DataInfo
    train_set: Dataset  # only for its class_to_idx (Tiny-ImageNet-C labels, ImageNet-O class list)
    eval_set: Dataset


@dataclass
class SuiteData:
    """The extra test sets of a run, opened (and so checked) before any model runs."""
    corruption: list[tuple[tuple[str, int], Dataset]] = field(default_factory=list)  # ((name, severity), set)
    ood: list[tuple[str, Dataset]] = field(default_factory=list)  # (name, images)
    ood_classes: list[int] | None = None


@dataclass
class EvalResult:
    numbers: dict[str, Any]  # everything that goes into report.json
    confidence: Tensor | None = None  # clean max-softmax per sample, for the reliability diagram
    correct: Tensor | None = None
    corruption_errors: dict[tuple[str, int], float] = field(default_factory=dict)


# ---------------------------------------------------------------- runs

def open_run(run_dir: str | Path, data_dir: str | None = None) -> RunData:
    """The run's recipe and eval set. Like `catchup.runs.load_run`, but the datasets are kept (the eval set
    is needed here) and built once for both weights."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CatchupError(f"no such run folder: {run}")
    if not (run / "config.yaml").exists():
        raise CatchupError(f"{run} has no config.yaml: not a catchup run folder")
    cfg = load_config(run / "config.yaml", {"data_dir": data_dir} if data_dir else ())
    train_set, eval_set, info = build_datasets(cfg.dataset, cfg.data_dir, input_size=cfg.input_size,
                                               train_transform=False, augment=Augment.from_config(cfg),
                                               num_classes=cfg.num_classes, splits=(cfg.train_split, cfg.val_split))
    trained, names = load_data_info(run), load_class_names(run)
    if trained is not None and trained.num_classes != info.num_classes:
        raise CatchupError(f"the dataset in {cfg.data_dir} has {info.num_classes} classes, the run was trained on "
                           f"{trained.num_classes} ({run / 'data_info.json'}): not the run's dataset")
    found = class_names(train_set)
    if names and found and found != names:
        first = next(i for i, (a, b) in enumerate(zip(found, names)) if a != b)
        raise CatchupError(f"the classes in {cfg.data_dir} are not the run's ({run / 'data_info.json'}): class "
                           f"{first} is {found[first]!r} there, {names[first]!r} in the run")
    return RunData(run, cfg, info, train_set, eval_set)


def load_model(run: RunData, weights: str) -> nn.Module:
    """The run's model with its final or EMA weights, in eval mode on the CPU."""
    if weights not in WEIGHTS:
        raise CatchupError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path = run.run_dir / WEIGHTS[weights]
    if weights == "ema" and not path.exists():
        raise CatchupError(f"{run.run_dir} has no EMA weights ({WEIGHTS['ema']}); was it trained with model_ema?")
    model = build_model(run.cfg, run.info)
    load_weights(model, path)
    return model.eval()


# ---------------------------------------------------------------- suites

def _bar(loader: Iterable, accelerator: Accelerator, desc: str) -> Iterable:
    return tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True)


def _loader(dataset: Dataset, options: EvalOptions, accelerator: Accelerator) -> DataLoader:
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                        pin_memory=torch.cuda.is_available())
    return accelerator.prepare_data_loader(loader)


def _top1(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).double().mean() * 100.0)


def clean_suite(logits: Tensor, targets: Tensor) -> dict[str, float]:
    m = classification_metrics(logits, targets)
    return {"top1": m.top1, "top5": m.top5, "top1_err": 100.0 - m.top1, "top5_err": 100.0 - m.top5,
            "nll": m.nll, "ece": m.ece, "n": m.n}


def fgsm_suite(model: nn.Module, loader: Iterable, info: DataInfo, eps: tuple[tuple[str, float], ...],
               accelerator: Accelerator) -> dict[str, dict[str, float]]:
    errors = fgsm_error(model, _bar(loader, accelerator, "fgsm"), mean=info.mean, std=info.std,
                        device=accelerator.device, eps_list=[v for _, v in eps],
                        gather=accelerator.gather_for_metrics)
    return {label: {"eps": value, "error": errors[value]} for label, value in eps}


def deformation_suite(model: nn.Module, run: RunData, options: EvalOptions, accelerator: Accelerator
                      ) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """Top-1 accuracy (%) under each deformation of the battery: (mean, sample std, every draw) per name.

    The random rotations and shears are drawn ``options.deform_draws`` times (the fixed zooms once, std 0).
    Each eval image gets its own matrix, drawn up front in dataset order from a seeded generator, so the
    numbers are the same whatever the number of processes and however the loader shards the set. A streamed
    eval set (WebDataset shards) has no dataset order: its images take the matrices in the order each loader
    worker streams them, reproducible for the same processes and workers.
    """
    means, stds, draws = {}, {}, {}
    for k, name in enumerate(DEFORMATIONS):
        spec = DEFORMATIONS[name]
        values = []
        for draw in range(1 if spec.kind == "zoom" else options.deform_draws):
            generator = torch.Generator().manual_seed(options.seed * 1_000_003 + k * 1009 + draw * 100_003)
            matrices = sample_matrices(spec, len(run.eval_set), generator)
            deformed = (_DeformedStream if isinstance(run.eval_set, IterableDataset) else _Deformed)(
                run.eval_set, matrices, options.deform_centre)
            loader = _loader(deformed, options, accelerator)
            logits, targets = evaluate_logits(model, _bar(loader, accelerator, name), accelerator.device,
                                              gather=accelerator.gather_for_metrics)
            values.append(_top1(logits, targets))
        means[name] = statistics.fmean(values)
        stds[name] = statistics.stdev(values) if len(values) > 1 else 0.0
        draws[name] = values
    return means, stds, draws


class _Deformed(Dataset):
    """An eval set whose item i is warped with matrices[i] (after normalisation: the fill is 0)."""

    def __init__(self, dataset: Dataset, matrices: Tensor, centre: str = "true") -> None:
        self.dataset, self.matrices, self.centre = dataset, matrices, centre

    def __len__(self) -> int:
        return len(self.matrices)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        x, y = self.dataset[index]
        return warp_batch(x[None], self.matrices[index:index + 1], self.centre)[0], y


class _DeformedStream(IterableDataset):
    """A streamed eval set whose i-th image in a loader worker's stream is warped with the matrix at that
    worker's i-th place (workers interleave: no two share a matrix)."""

    def __init__(self, dataset: IterableDataset, matrices: Tensor, centre: str = "true") -> None:
        self.dataset, self.matrices, self.centre = dataset, matrices, centre

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        worker = get_worker_info()
        workers, first = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for i, (x, y) in enumerate(self.dataset):
            k = (first + i * workers) % len(self.matrices)
            yield warp_batch(x[None], self.matrices[k:k + 1], self.centre)[0], y


class _Tagged(Dataset):
    """Concatenated datasets whose items carry the index of the part they come from, so per-part counts
    survive any sharding or reordering across processes."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.concat = ConcatDataset(parts)

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        x, y = self.concat[index]
        return x, y, bisect.bisect_right(self.concat.cumulative_sizes, index)


def corruption_sets(run: RunData, root: Path) -> list[tuple[tuple[str, int], Dataset]]:
    """((corruption, severity), dataset) for every slice under `root`, in the layout of the run's dataset."""
    family = run.info.family
    if family not in ("cifar", "tinyimagenet"):
        raise CatchupError(f"the corruption suite needs a CIFAR-10/100 or Tiny-ImageNet run; {run.run_dir} "
                           f"was trained on {run.cfg.dataset}")
    names = available_corruptions(root)
    if not names:
        raise CatchupError(f"{root} holds no corruption data (<corruption>.npy or <corruption>/<severity>/ folders)")
    transform, size = build_eval_transform(run.info), run.info.input_size
    sets = []
    for name in names:
        for severity in SEVERITIES:
            try:
                if family == "cifar":
                    ds = CifarCorrupted(root, name, severity, transform, image_size=size)
                    if int(ds.labels.max()) >= run.info.num_classes:
                        raise CatchupError(f"{root}/labels.npy holds labels up to {int(ds.labels.max())} but the "
                                           f"model has {run.info.num_classes} classes (CIFAR-100-C for CIFAR-10?)")
                else:
                    ds = TinyImageNetCorrupted(root, name, severity, transform, run.train_set.class_to_idx, size)
            except (ValueError, OSError, EOFError, pickle.UnpicklingError) as err:  # damaged .npy / images
                raise CatchupError(f"cannot read corruption {name!r} in {root}: {err}".replace("\n", " ")) from None
            sets.append(((name, severity), ds))
    return sets


def corruption_suite(model: nn.Module, sets: list[tuple[tuple[str, int], Dataset]], options: EvalOptions,
                     accelerator: Accelerator) -> tuple[dict[str, Any], dict[tuple[str, int], float]]:
    """Top-1 error (%) per (corruption, severity) and the mCE summary; one loader over all slices."""
    loader = _loader(_Tagged([ds for _, ds in sets]), options, accelerator)
    correct = torch.zeros(len(sets), dtype=torch.float64)
    total = torch.zeros(len(sets), dtype=torch.float64)
    with torch.no_grad():
        for x, y, part in _bar(loader, accelerator, "corruptions"):
            hit = (model(x).argmax(dim=1) == y).long()  # gloo cannot gather bool tensors
            hit, part = accelerator.gather_for_metrics((hit, part))
            part = part.long().cpu()
            correct += torch.bincount(part, weights=hit.double().cpu(), minlength=len(sets))
            total += torch.bincount(part, minlength=len(sets)).double()
    errors = {key: float(100.0 - 100.0 * c / n) for (key, _), c, n in zip(sets, correct.tolist(), total.tolist())}
    summary = corruption_summary(errors)
    table: dict[str, dict[str, float]] = {}
    for (name, severity), err in errors.items():
        table.setdefault(name, {})[str(severity)] = err
    numbers = {"errors": table, "per_corruption": summary["per_corruption"],
               "per_severity": {str(s): e for s, e in summary["per_severity"].items()},
               "mce_15": summary["mce_15"], "mce_all": summary["mce_all"], "n_per_slice": len(sets[0][1])}
    return numbers, errors


class _FitSize:
    """The fixed-size families' eval transform refuses other sizes; OOD sets come in any size, so resize first."""

    def __init__(self, size: int, transform: Any) -> None:
        self.size, self.transform = size, transform

    def __call__(self, image: Image.Image) -> Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return self.transform(image)


def ood_images(folder: Path, info: DataInfo) -> ImageList:
    """Every image under `folder` (any depth), label -1, with the run's eval transform."""
    if not folder.is_dir():
        raise CatchupError(f"OOD image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise CatchupError(f"OOD folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    transform = build_eval_transform(info)
    if info.family in FIXED_FAMILIES:
        transform = _FitSize(info.input_size, transform)
    return ImageList([(str(p), -1) for p in files], transform)


def open_suite_data(run: RunData, options: EvalOptions) -> SuiteData:
    data = SuiteData()
    if "corruption" in options.suites:
        data.corruption = corruption_sets(run, options.corruption_dir)
    if "ood" in options.suites:
        data.ood = [(name, ood_images(d, run.info)) for name, d in zip(short_names(options.ood_dirs), options.ood_dirs)]
        if options.ood_classes is not None:
            classes = read_class_indices(options.ood_classes, getattr(run.train_set, "class_to_idx", None))
            if not all(0 <= c < run.info.num_classes for c in classes):
                raise CatchupError(f"{options.ood_classes} lists classes outside 0..{run.info.num_classes - 1}")
            if not set(classes) & set(dataset_labels(run.eval_set)):
                raise CatchupError(f"no eval image belongs to the classes listed in {options.ood_classes}")
            data.ood_classes = classes
    return data


def ood_suite(model: nn.Module, data: SuiteData, in_logits: Tensor, in_targets: Tensor, options: EvalOptions,
              accelerator: Accelerator) -> dict[str, Any]:
    """FPR95/AUROC/AUPR (%) of the max-softmax detector, eval set against each OOD folder, and their mean."""
    classes = data.ood_classes
    if classes is not None:
        in_logits = restrict_logits(in_logits[torch.isin(in_targets, torch.as_tensor(classes))], classes)
    in_scores = max_softmax_score(in_logits)
    per_set: dict[str, dict[str, float]] = {}
    for name, images in data.ood:
        loader = _loader(images, options, accelerator)
        logits, _ = evaluate_logits(model, _bar(loader, accelerator, f"ood {name}"), accelerator.device,
                                    gather=accelerator.gather_for_metrics)
        if classes is not None:
            logits = restrict_logits(logits, classes)
        per_set[name] = {**ood_metrics(in_scores, max_softmax_score(logits)), "n_ood": logits.shape[0]}
    mean = {k: sum(m[k] for m in per_set.values()) / len(per_set) for k in ("fpr95", "auroc", "aupr")}
    return {"sets": per_set, **mean, "n_in": int(in_scores.numel()),
            "classes": len(classes) if classes is not None else None}


def reliance_suite(model: nn.Module, loader: Iterable, accelerator: Accelerator, n_steps: int) -> dict[str, Any]:
    """Accuracy as each sample's largest (or smallest) pooled features are zeroed, and the feature-mass shares."""
    net = accelerator.unwrap_model(model)
    features, targets = pooled_features(net, _bar(loader, accelerator, "reliance"), accelerator.device,
                                        gather=accelerator.gather_for_metrics)
    d = features.shape[1]
    fractions = [i / n_steps for i in range(n_steps + 1)]
    steps = [round(f * d) for f in fractions]  # repeats when d < n_steps, so runs of any width line up
    tenth = round(0.1 * d)
    head = net.get_classifier()
    curves = {order: dict(feature_drop_curve(features, head, targets, sorted(set(steps) | {tenth}), order))
              for order in ("largest", "smallest")}
    mass = feature_mass_share(features, MASS_SHARES)
    return {"num_features": d, "fractions": fractions, "steps": steps,
            "largest_first": [curves["largest"][s] for s in steps],
            "smallest_first": [curves["smallest"][s] for s in steps],
            "acc_drop10": curves["largest"][tenth],
            **{f"mass_share_{round(q * 100)}": 100.0 * v for q, v in mass.items()}}


# ---------------------------------------------------------------- one model

def evaluate_model(model: nn.Module, run: RunData, data: SuiteData, weights: str, options: EvalOptions,
                   accelerator: Accelerator) -> EvalResult:
    """Run every selected suite on one model; the numbers are identical on every process."""
    model = accelerator.prepare_model(model, evaluation_mode=True)
    loader = _loader(run.eval_set, options, accelerator)
    numbers: dict[str, Any] = {"run": str(run.run_dir), "weights": weights, "model": run.cfg.model,
                               "dataset": run.cfg.dataset, "mix": run.cfg.mix, "n": len(run.eval_set)}
    result = EvalResult(numbers)
    logits = targets = None
    if "clean" in options.suites or "ood" in options.suites:
        logits, targets = evaluate_logits(model, _bar(loader, accelerator, "clean"), accelerator.device,
                                          gather=accelerator.gather_for_metrics)
    if "clean" in options.suites:
        numbers["clean"] = clean_suite(logits, targets)
        confidence, prediction = logits.softmax(dim=1).max(dim=1)
        result.confidence, result.correct = confidence, prediction == targets
    if "fgsm" in options.suites:
        numbers["fgsm"] = fgsm_suite(model, loader, run.info, options.fgsm_eps, accelerator)
    if "corruption" in options.suites:
        numbers["corruption"], result.corruption_errors = corruption_suite(model, data.corruption, options,
                                                                           accelerator)
    if "deformation" in options.suites:
        numbers["deformation"], numbers["deformation_std"], numbers["deformation_draws"] = deformation_suite(
            model, run, options, accelerator)
    if "ood" in options.suites:
        numbers["ood"] = ood_suite(model, data, logits, targets, options, accelerator)
    if "reliance" in options.suites:
        numbers["reliance"] = reliance_suite(model, loader, accelerator, options.reliance_steps)
    accelerator.free_memory()
    return result
