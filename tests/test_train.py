"""train.py end to end on the bundled digits with a tiny PreActResNet-18 (width 4)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import catchup.models  # noqa: F401
from catchup import CatchupError
from catchup.cli import run_cli
from catchup.analysis import load_filter_norms
from catchup.runs import latest_checkpoint, load_run
from tests.helpers import load_safetensors, run_train, wandb_records

ROOT = Path(__file__).resolve().parents[1]


# Measured over seeds 0-2 for every method at these settings (half the digits, two epochs at full lr, one
# evaluation at the end): eval top-1 28-66 % (chance is 10 %), and the epoch's training loss always fell (by
# 0.08 to 0.7). A method whose mixed inputs and targets disagree, or that never trains, fails both bounds.
LEARNS = ("--train-fraction", "0.5", "--warmup-epochs", "0", "--eval-every", "2")


@pytest.mark.parametrize("method", ["none", "mixup", "cutmix", "manifold", "moex", "catchup", "saliencymix",
                                    "resizemix", "snapmix", "alignmix", "recursivemix", "comixup"])
def test_two_epochs_with_each_method_learn_the_digits(tmp_path, method):
    out = tmp_path / method
    run_train(out, "--mix", method, *LEARNS)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"]), rows
    assert float(rows[1]["eval_top1"]) > 20.0, rows       # twice chance
    assert (out / "config.yaml").read_text().count(f"mix: {method}") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_done"] == 2 and results["last_top1"] == float(rows[1]["eval_top1"])
    if method != "catchup":     # the weights' format does not depend on the method: checked once
        return
    # the final weights load into a plain timm model
    model = timm.create_model("preactresnet18", num_classes=10, in_chans=1, width=4)
    timm.models.load_checkpoint(model, str(out / "model.safetensors"))
    saved = load_safetensors(out / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    loaded = load_run(out)          # from config.yaml + data_info.json, without touching the data
    assert loaded.info.num_classes == 10 and loaded.info.in_chans == 1 and not loaded.model.training


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_max_steps_gives_the_same_weights(tmp_path, workers):
    common = ("--mix", "catchup", "--workers", str(workers), "--model-ema", "--model-ema-decay", "0.9")
    run_train(tmp_path / "straight", *common)
    run_train(tmp_path / "split", *common, "--max-steps", "7")      # stops inside epoch 0 (11 steps/epoch)
    assert latest_checkpoint(tmp_path / "split").name == "step_00000007"
    run_train(tmp_path / "split", *common, "--resume")
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = (load_safetensors(tmp_path / run / name) for run in ("straight", "split"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    rows = list(csv.DictReader((tmp_path / "split" / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(CatchupError, match="NaN or Inf"):
        run_train(out, "--lr", "1.0e+30", "--sched", "none", "--checkpoint-every-steps", "1", "--log-every", "1",
                  "--epochs", "3")
    last = latest_checkpoint(out)
    assert last is not None
    weights = load_safetensors(last / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model.safetensors").exists()


def test_interrupted_checkpoint_never_becomes_latest(tmp_path, monkeypatch):
    out = tmp_path / "crash"
    run_train(out, "--epochs", "1")
    first = latest_checkpoint(out)
    from accelerate import Accelerator
    original = Accelerator.save_state

    def crash_midway(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)     # everything written ...
        raise KeyboardInterrupt                  # ... but the process dies before publishing

    monkeypatch.setattr(Accelerator, "save_state", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        run_train(out, "--epochs", "2", "--resume")
    assert latest_checkpoint(out) == first
    monkeypatch.setattr(Accelerator, "save_state", original)
    run_train(out, "--epochs", "2", "--resume")       # the half-written folder is cleaned up, the run completes
    assert latest_checkpoint(out).name != first.name
    assert not list((out / "checkpoints").glob(".incomplete-*"))


def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    out = tmp_path / "rot"
    run_train(out, "--epochs", "3", "--checkpoint-keep", "2")
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(kept) == 2 and latest_checkpoint(out).name == kept[-1]


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "twice"
    run_train(out, "--epochs", "1")
    with pytest.raises(CatchupError, match="already holds a run"):
        run_train(out, "--epochs", "1")
    run_train(out, "--epochs", "1", "--overwrite")
    assert len(list(tmp_path.glob("twice.old-*"))) == 1      # the old run was moved aside, not deleted


def test_wandb_offline_run_holds_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    run_train(out, "--wandb-mode", "offline", "--epochs", "1", "--wandb-tags", "[test, digits]",
              "--track-filters", "--track-filters-every", "4")
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert config["mix"] == "catchup" and config["model_kwargs"] == {"width": 4}
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert any("train/loss" in h for h in history)
    assert any("epoch/eval_top1" in h for h in history)
    assert any(any(k.startswith("filters/") for k in h) for h in history)       # the filter-norm tracker
    norms = load_filter_norms(out / "filter_norms.npz")
    assert all(list(v["steps"]) == [0, 4, 8] and v["act_norm"].shape[0] == 3 for v in norms.values())
    run = next(r.run for r in records if r.HasField("run"))
    assert run.run_id == (out / "wandb_run_id.txt").read_text().strip()
    assert list(run.tags) == ["test", "digits"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    # Refused before torch loads: in a process of their own, as a user meets them.
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for args, message in [
        (["--config", "configs/quickstart.yaml", "--learning-rate", "0.1"], "did you mean 'lr'"),
        (["--config", "configs/nope.yaml"], "nope.yaml"),
    ]:
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    # Refused once torch has loaded: here, through the run_cli wrapper train.py's __main__ uses (a process of
    # their own would spend seconds importing torch again).
    for args, message in [
        (["--config", "configs/quickstart.yaml", "--mix", "catchupp", "--output", str(tmp_path / "x")],
         "unknown mixing method"),
        (["--config", "configs/quickstart.yaml", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
          "--output", str(tmp_path / "y")], "cifar"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            run_cli(lambda: run_train(Path(args[-1]), *args[2:-2], tiny=False))
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and message in lines[-1], stderr
        assert len(lines) == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("recipe,expected", [
    ("resnet50_catchup_300ep", ["opt: lamb", "bce_loss: true", "bce_target_thresh: 0.2", "aa: rand-m7-mstd0.5-inc1",
                                "aug_repeats: 3", "crop_pct: 0.95"]),
    ("resnet50_cutmix_clovaai_300ep", ["opt: sgd", "mix: cutmix", "decay_milestones: [75, 150, 225]",
                                       "crop_pct: 0.875"])])
def test_imagenet_recipe_smoke_run_on_a_tiny_image_folder(tmp_path, recipe, expected):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    out = tmp_path / "r50"
    run_train(out, "--data-dir", str(tmp_path / "imagenet"), "--input-size", "32", "--batch-size", "4",
              "--eval-batch-size", "4", "--max-steps", "2", "--workers", "0", "--wandb-mode", "disabled",
              config=f"configs/imagenet/{recipe}.yaml", tiny=False)
    assert latest_checkpoint(out).name == "step_00000002"
    cfg = (out / "config.yaml").read_text()
    assert all(line in cfg for line in expected), cfg


def test_puzzlemix_two_epochs_on_a_cifar_layout(tmp_path):
    # PuzzleMix needs a square side divisible by 16, which the 8x8 digits are not: a tiny CIFAR-10 in the
    # published pickle layout (4 images per training batch file) stands in.
    from tests.fixtures_data import write_cifar10
    write_cifar10(tmp_path / "cifar10", per_batch=4, n_test=6)
    out = tmp_path / "puzzle"
    run_train(out, "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar10"), "--mix", "puzzlemix",
              "--batch-size", "4", "--eval-batch-size", "6", "--train-fraction", "1.0")
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and all(float(r["train_loss"]) > 0 for r in rows)
