"""A run's weights in the Hugging Face layout timm reads (config.json + model.safetensors), for sharing.

    python -m catchup.export runs/quickstart exported/quickstart [--ema] [--push-to-hub user/repo]

    import catchup.models, timm   # registers the project's own models (preactresnet18, ...) with timm
    model = timm.create_model("local-dir:exported/quickstart", pretrained=True)
    data_config = timm.data.resolve_data_config(model=model)   # the run's input size and normalisation

With `wandb_log_model: true` in a recipe, train.py logs the same folder as a W&B model artifact.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from timm.models import push_to_hf_hub, save_for_hf
from torch import nn

from catchup.cli import ArgumentParser, run_cli, user_path
from catchup.config import TrainConfig
from catchup.data import DataInfo
from catchup.data.transforms import FIXED_FAMILIES
from catchup.errors import CatchupError
from catchup.runs import load_run

EXPORT_FILES = ("config.json", "model.safetensors")


def data_config(info: DataInfo) -> dict[str, Any]:
    """timm's preprocessing fields for the run's evaluation transform (catchup.data.transforms)."""
    size = (info.in_chans, info.input_size, info.input_size)
    if info.family in FIXED_FAMILIES:   # no resize: the whole image, normalised
        crop = dict(crop_pct=1.0, crop_mode="center")
    elif info.family == "finegrained":  # square resize to 256/224 of the crop, centre crop
        crop = dict(crop_pct=0.875, crop_mode="squash")
    else:                               # shorter side to crop/0.875, centre crop
        crop = dict(crop_pct=0.875, crop_mode="center")
    return dict(input_size=size, mean=tuple(info.mean), std=tuple(info.std), interpolation="bilinear", **crop)


def _model_config(cfg: TrainConfig, weights: str) -> dict[str, Any]:
    """Top-level config.json fields timm ignores, recording where the weights come from."""
    return {"catchup": {"dataset": cfg.dataset, "mix": cfg.mix, "epochs": cfg.epochs, "weights": weights}}


def save_hf_folder(model: nn.Module, cfg: TrainConfig, info: DataInfo, out_dir: str | Path,
                   weights: str = "final") -> Path:
    """Write `model` as config.json + model.safetensors into `out_dir` (timm.models.save_for_hf)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - {*EXPORT_FILES, "README.md"}):
        raise CatchupError(f"{out} exists and holds other files; export into a new or empty folder")
    save_for_hf(model, str(out), model_config=_model_config(cfg, weights), data_config=data_config(info),
                safe_serialization=True)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, weights: str = "final",
               push_to_hub: str | None = None) -> Path:
    """Export a finished run's final (or EMA) weights to `out_dir`, and optionally push them to a Hub repo."""
    run = load_run(run_dir, weights)
    out = save_hf_folder(run.model, run.cfg, run.info, out_dir, weights)
    if push_to_hub:
        try:
            push_to_hf_hub(run.model, push_to_hub, model_config=_model_config(run.cfg, weights),
                           data_config=data_config(run.info), safe_serialization=True,
                           commit_message=f"catchup run {Path(run_dir).name} ({weights} weights)")
        except Exception as err:   # huggingface_hub raises many types (offline, no token, HTTP)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CatchupError(f"cannot push to the Hugging Face Hub repo {push_to_hub!r} "
                               f"({type(err).__name__}: {first}); the export in {out} is complete") from None
    return out


def log_model_artifact(wandb_run: Any, model: nn.Module, cfg: TrainConfig, info: DataInfo) -> None:
    """Log `model` in the exported layout as a W&B artifact of type "model", named `model-<run id>`."""
    import wandb

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_folder(model, cfg, info, tmp)
        artifact = wandb.Artifact(f"model-{wandb_run.id}", type="model",
                                  metadata={"model": cfg.model, "dataset": cfg.dataset, "mix": cfg.mix})
        for name in EXPORT_FILES:   # copied into W&B's staging area here, before the folder goes away
            artifact.add_file(str(Path(tmp) / name), name=name)
        wandb_run.log_artifact(artifact, aliases=["latest"])


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m catchup.export",
                            description="export a run's weights for timm: config.json + model.safetensors")
    parser.add_argument("run", type=user_path, help="run folder (config.yaml, model.safetensors)")
    parser.add_argument("out", type=user_path, help="new folder for the export; load it with "
                        "timm.create_model('local-dir:OUT', pretrained=True)")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (runs trained with model_ema)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hugging Face Hub repo "
                        "(user/name; needs a network and `huggingface-cli login`)")
    args = parser.parse_args(argv)
    out = export_run(args.run, args.out, "ema" if args.ema else "final", args.push_to_hub)
    print(f"exported {args.run} to {out}" + (f" and {args.push_to_hub} on the Hub" if args.push_to_hub else ""))
    return out


if __name__ == "__main__":
    run_cli(main)
