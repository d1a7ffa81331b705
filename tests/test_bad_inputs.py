"""Bad inputs to train.py, evaluate.py and `python -m catchup.analysis`, each in its own process, as a user meets
them: a non-zero exit, exactly one `error:` line naming the problem, no traceback, and every run folder the
command was pointed at byte-identical afterwards."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_script
from catchup.cli import run_cli
from catchup.errors import CatchupError
from tests.helpers import run_train, snapshot

ROOT = Path(__file__).resolve().parents[1]
QUICK = "configs/quickstart.yaml"
TINY = ["--model-kwargs", "{width: 4}", "--train-fraction", "0.25", "--batch-size", "32", "--epochs", "1",
        "--wandb-mode", "disabled", "--workers", "0", "--log-every", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def place(tmp_path_factory, one_thread) -> dict[str, Path]:
    """One finished tiny run, and copies of it damaged in the ways the table needs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    run_train(run, "--epochs", "1")
    ckpt = run / "checkpoints" / "step_00000011"
    p = {"root": root, "run": run, "ckpt": ckpt}

    def copy(name: str) -> Path:
        shutil.copytree(run, root / name)
        return root / name

    p["torn_model"] = copy("torn_model")
    data = (ckpt / "model.safetensors").read_bytes()
    (p["torn_model"] / "checkpoints/step_00000011/model.safetensors").write_bytes(data[: len(data) // 2])
    p["zero_opt"] = copy("zero_opt")
    size = (ckpt / "optimizer.bin").stat().st_size
    (p["zero_opt"] / "checkpoints/step_00000011/optimizer.bin").write_bytes(bytes(size))
    p["torn_custom"] = copy("torn_custom")
    data = (ckpt / "state_progress.pkl").read_bytes()
    (p["torn_custom"] / "checkpoints/step_00000011/state_progress.pkl").write_bytes(data[:40])
    p["no_config"] = copy("no_config")                       # a run folder that lost its config.yaml
    (p["no_config"] / "config.yaml").unlink()
    p["torn_weights"] = copy("torn_weights")                 # the final weights evaluate.py reads
    data = (run / "model.safetensors").read_bytes()
    (p["torn_weights"] / "model.safetensors").write_bytes(data[:100])
    p["latin1"] = copy("latin1")                             # a run whose config.yaml is not UTF-8
    text = (run / "config.yaml").read_text()
    (p["latin1"] / "config.yaml").write_bytes(text.replace("# resolved", "# r\xe9solu").encode("latin-1"))
    p["died"] = root / "died"                                # stopped before its first checkpoint
    p["died"].mkdir()
    for name in ("config.yaml", "data_info.json"):
        shutil.copy(run / name, p["died"] / name)
    p["link"] = root / "link"                               # a symlink to the run's checkpoint
    p["link"].symlink_to(ckpt, target_is_directory=True)
    p["empty"] = root / "empty"
    p["empty"].mkdir()
    p["file"] = root / "a_file"
    p["file"].write_text("not a folder\n")
    p["latin1_recipe"] = root / "latin1.yaml"
    p["latin1_recipe"].write_bytes("# r\xe9glages\nlr: 0.1\n".encode("latin-1"))
    p["list_recipe"] = root / "list.yaml"
    p["list_recipe"].write_text("- lr: 0.1\n")
    p["broken_recipe"] = root / "broken.yaml"
    p["broken_recipe"].write_text("lr: [0.1\n")
    p["garbage_npz"] = root / "garbage.npz"
    p["garbage_npz"].write_bytes(b"PK\x03\x04 but nothing after")
    p["plain_npz"] = root / "plain.npz"
    np.savez(p["plain_npz"], x=np.zeros(3))
    p["images"] = _image_folder(root / "images")
    p["empty_val_image"] = _image_folder(root / "empty_val_image", "val/n01/3.JPEG", b"")
    p["one_class"] = _image_folder(root / "one_class", None, classes=("n01",))
    return p


def _image_folder(root: Path, bad: str | None = "train/n02/2.JPEG", content: bytes = b"\xff\xd8 this is no image",
                  classes: tuple[str, ...] = ("n01", "n02")) -> Path:
    """An ImageNet-style folder with one corrupt (or empty) JPEG among good ones."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    if bad:
        (root / bad).write_bytes(content)
    return root


def train(*args):
    return ("train.py", ["--config", QUICK, *TINY, *args])


def resume(key: str, *args):
    return lambda p: train("--output", p[key], "--resume", *args)


UNWRITABLE = "/sys/catchup-output"      # sysfs takes no new files, not even from root
IMAGENET = ["--config", "configs/imagenet/resnet50_catchup_300ep.yaml", "--input-size", "32", "--batch-size", "4",
            "--eval-batch-size", "4", "--max-steps", "2", "--wandb-mode", "disabled"]

# (id, command builder given the fixture's paths, what the error line must contain, folders that must not change)
CASES = [
    # train.py: the recipe
    ("recipe-missing", lambda p: train("--config", p["root"] / "nope.yaml"), "recipe file not found", ()),
    ("recipe-is-a-folder", lambda p: ("train.py", ["--config", p["root"]]), "recipe file not found", ()),
    ("recipe-not-utf8", lambda p: ("train.py", ["--config", p["latin1_recipe"]]), "not UTF-8", ()),
    ("recipe-a-list", lambda p: ("train.py", ["--config", p["list_recipe"]]), "must be a mapping", ()),
    ("recipe-broken-yaml", lambda p: ("train.py", ["--config", p["broken_recipe"]]), "cannot parse recipe", ()),
    ("unknown-key", lambda p: train("--learning-rate", "0.1"), "did you mean 'lr'", ()),
    ("wrong-type", lambda p: train("--epochs", "two"), "'epochs' expects an int", ()),
    ("out-of-range", lambda p: train("--epochs", "0"), "must be >= 1", ()),
    ("bad-choice", lambda p: train("--wandb-mode", "sometimes"), "must be one of", ()),
    ("milestone-after-end", lambda p: train("--sched", "multistep", "--decay-milestones", "[5]"),
     "must all be < epochs", ()),
    ("unknown-optimizer", lambda p: train("--opt", "adamx"), "not a timm optimizer", ()),
    ("stray-argument", lambda p: train("stray"), "unexpected command-line argument", ()),
    # train.py: the output folder
    ("output-under-a-file", lambda p: train("--output", p["file"] / "run"), "is a file, not a folder", ()),
    ("output-not-writable", lambda p: train("--output", UNWRITABLE), "cannot write the output folder", ()),
    ("rerun-over-a-run", lambda p: train("--output", p["run"]), "already holds a run", ("run",)),
    ("rerun-over-a-run-that-died", lambda p: train("--output", p["died"]), "--overwrite", ("died",)),
    ("resume-and-overwrite", resume("run", "--overwrite"), "pass one of them", ("run",)),
    ("resume-nothing", resume("empty"), "holds no run to resume", ("empty",)),
    ("resume-a-home-path", lambda p: ("env", [f"HOME={p['root']}", sys.executable, "train.py", "--config", QUICK,
                                              *TINY, "--output=~/nowhere", "--resume"]), "--resume: /", ()),
    ("output-in-a-checkpoint", lambda p: train("--output", p["ckpt"]), "lies inside the run folder", ("run",)),
    ("output-through-a-link", lambda p: train("--output", p["link"]), "lies inside the run folder", ("run",)),
    ("output-in-checkpoints", lambda p: train("--output", p["run"] / "checkpoints", "--overwrite"),
     "lies inside the run folder", ("run",)),
    ("overwrite-the-current-folder", lambda p: ("env", ["-C", p["run"], sys.executable, ROOT / "train.py", "--config",
                                                        ROOT / QUICK, *TINY, "--output", ".", "--overwrite"]),
     "while it is the current folder", ("run",)),
    ("resume-lost-config", resume("no_config", "--lr", "5"), "lost its config.yaml", ("no_config",)),
    ("resume-fewer-steps", resume("run", "--max-steps", "5"), "max_steps 5 is fewer than the run has done (11)",
     ("run",)),
    ("resume-path-missing", lambda p: train("--output", p["run"], "--resume", p["root"] / "nope"),
     "not a checkpoint folder", ("run",)),
    # train.py: resume with a different recipe
    ("resume-lr", resume("run", "--lr", "1e6"), "lr (run 0.1, now 1000000.0)", ("run",)),
    ("resume-mix", resume("run", "--mix", "mixup"), "mix (run 'catchup', now 'mixup')", ("run",)),
    ("resume-batch-size", resume("run", "--batch-size", "16"), "batch_size (run 32, now 16)", ("run",)),
    ("resume-seed", resume("run", "--seed", "5"), "seed (run 0, now 5)", ("run",)),
    ("resume-dataset", resume("run", "--dataset", "fashion_mnist"), "dataset (run 'digits'", ("run",)),
    ("resume-model", resume("run", "--model-kwargs", "{width: 8}"), "model_kwargs", ("run",)),
    ("resume-two-keys", resume("run", "--smoothing", "0.1", "--mix-prob", "0.5"), "smoothing (run 0.0, now 0.1), "
     "mix_prob (run None, now 0.5)", ("run",)),
    # train.py: damaged checkpoints and a model that does not fit
    ("resume-torn-model", resume("torn_model"), "step_00000011/model.safetensors cannot be read", ("torn_model",)),
    ("resume-zeroed-optimizer", resume("zero_opt"), "step_00000011/optimizer.bin is damaged", ("zero_opt",)),
    ("resume-torn-custom-state", resume("torn_custom"), "step_00000011/state_progress.pkl cannot be read",
     ("torn_custom",)),
    ("resume-other-model", lambda p: train("--output", p["root"] / "wider", "--resume", p["ckpt"],
                                           "--model-kwargs", "{width: 8}"), "does not fit the model", ("run",)),
    # train.py: data and environment
    ("corrupt-image-in-worker", lambda p: ("train.py", [*IMAGENET, "--data-dir", p["images"], "--workers", "1",
                                                        "--output", p["root"] / "img1"]), "2.JPEG", ()),
    ("corrupt-image-in-process", lambda p: ("train.py", [*IMAGENET, "--data-dir", p["images"], "--workers", "0",
                                                         "--output", p["root"] / "img0"]), "2.JPEG", ()),
    ("zero-byte-validation-image", lambda p: ("train.py", [*IMAGENET, "--data-dir", p["empty_val_image"], "--workers",
                                                           "0", "--eval-every", "1", "--output", p["root"] / "val0"]),
     "n01/3.JPEG", ()),
    ("one-class-dataset", lambda p: ("train.py", [*IMAGENET, "--data-dir", p["one_class"], "--output",
                                                  p["root"] / "one"]), "a classifier needs at least 2", ()),
    ("dataset-missing", lambda p: train("--dataset", "cifar10", "--data-dir", p["root"] / "none",
                                        "--output", p["root"] / "c10"), "cifar", ()),
    ("unknown-mixer", lambda p: train("--mix", "catchupp", "--output", p["root"] / "mx"), "unknown mixing method",
     ()),
    ("bad-stop-signal", lambda p: ("env", ["CATCHUP_STOP_SIGNALS=SIGFOO", sys.executable, "train.py", "--config",
                                           QUICK, *TINY, "--output", p["root"] / "sig"]), "SIGFOO", ()),
    # evaluate.py
    ("eval-missing-run", lambda p: ("evaluate.py", ["--run", p["root"] / "nope"]), "no such run folder", ()),
    ("eval-output-under-a-file", lambda p: ("evaluate.py", ["--run", p["run"], "--output", p["file"] / "r"]),
     "is a file, not a folder", ("run",)),
    ("eval-output-not-writable", lambda p: ("evaluate.py", ["--run", p["run"], "--output", UNWRITABLE]),
     "cannot write the report folder", ("run",)),
    ("eval-unknown-suite", lambda p: ("evaluate.py", ["--run", p["run"], "--suite", "bogus"]), "unknown suite",
     ("run",)),
    ("eval-eps-out-of-range", lambda p: ("evaluate.py", ["--run", p["run"], "--fgsm-eps", "2"]),
     "outside [0, 1]", ("run",)),
    ("eval-no-ema", lambda p: ("evaluate.py", ["--run", p["run"], "--weights", "ema"]), "no EMA weights",
     ("run",)),
    ("eval-config-not-utf8", lambda p: ("evaluate.py", ["--run", p["latin1"]]), "not UTF-8", ("latin1",)),
    ("eval-torn-weights", lambda p: ("evaluate.py", ["--run", p["torn_weights"]]), "cannot read weights",
     ("torn_weights",)),
    ("eval-two-runs-one-output", lambda p: ("evaluate.py", [p["run"], p["latin1"]]), "pass --output",
     ("run", "latin1")),
    ("eval-batch-size-0", lambda p: ("evaluate.py", ["--run", p["run"], "--batch-size", "0"]), "--batch-size",
     ("run",)),
    ("eval-corruption-without-data", lambda p: ("evaluate.py", ["--run", p["run"], "--suite", "corruption"]),
     "--corruption-dir", ("run",)),
    # python -m catchup.analysis
    ("analysis-garbage-npz", lambda p: ("-m", ["filters", "--npz", p["garbage_npz"]]), "is not an .npz file", ()),
    ("analysis-npz-without-stages", lambda p: ("-m", ["filters", "--npz", p["plain_npz"]]), "no 'stages' entry",
     ()),
    ("analysis-missing-npz", lambda p: ("-m", ["filters", "--npz", p["root"] / "nope.npz"]), "no such filter-norm",
     ()),
    ("analysis-steps-0", lambda p: ("-m", ["filters", "--npz", p["plain_npz"], "--steps", "0"]), "--steps", ()),
    ("analysis-topk-0", lambda p: ("-m", ["activations", "--run", p["run"], "--topk", "0"]), "--topk", ("run",)),
    ("analysis-images-0", lambda p: ("-m", ["activations", "--run", p["run"], "--images", "0"]), "--images",
     ("run",)),
    ("analysis-landscape-steps-1", lambda p: ("-m", ["landscape", "--run", p["run"], "--steps", "1"]),
     "--steps must be >= 2", ("run",)),
    ("analysis-range-0", lambda p: ("-m", ["landscape", "--run", p["run"], "--range", "0"]), "--range", ("run",)),
    ("analysis-range-inf", lambda p: ("-m", ["landscape", "--run", p["run"], "--range", "inf"]), "finite", ("run",)),
    ("analysis-missing-run", lambda p: ("-m", ["activations", "--run", p["root"] / "nope"]), "no such run folder",
     ()),
    ("analysis-output-under-a-file", lambda p: ("-m", ["activations", "--run", p["run"], "--output",
                                                       p["file"] / "x"]), "is a file, not a folder", ("run",)),
    ("analysis-output-not-writable", lambda p: ("-m", ["activations", "--run", p["run"], "--output", UNWRITABLE]),
     "cannot write the output folder", ("run",)),
    ("analysis-device-not-here", lambda p: ("-m", ["activations", "--run", p["run"], "--device", "cuda:99"]),
     "--device cuda:99", ("run",)),
    ("analysis-device-unknown", lambda p: ("-m", ["activations", "--run", p["run"], "--device", "blah"]),
     "not a device name", ("run",)),
]


def _command(kind: str, args: list) -> list[str]:
    args = [str(a) for a in args]
    if kind == "-m":
        return [sys.executable, "-m", "catchup.analysis", *args]
    if kind == "env":
        return ["env", *args]
    return [sys.executable, kind, *args]


@pytest.mark.parametrize("build, message, untouched", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(place, build, message, untouched):
    kind, args = build(place)
    watched = [place[k] for k in untouched] + [place["run"]]
    before = [snapshot(f) for f in watched]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(_command(kind, args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert [snapshot(f) for f in watched] == before


# Recipe values: train.py refuses them before torch loads (tests/test_package.py checks that it does not load),
# so each case runs in this process, through train.py's own main and run_cli as a user's process would.
DEEP = "[" * 5000 + "]" * 5000
RECIPE_CASES = [
    # (id, recipe text, command-line overrides, what the error line must contain)
    ("list-for-a-float", "lr: [0.1]", [], "'lr' expects a float"),
    ("mapping-for-a-string", "mix: {catchup: 1}", [], "'mix' expects a string"),
    ("list-as-a-key", "? [lr]\n: 0.1", [], "found unhashable key"),
    ("list-as-a-mix_kwargs-key", "mix_kwargs: {? [a] : 1}", [], "found unhashable key"),
    ("number-as-a-mix_kwargs-key", "mix_kwargs: {1: 2}", [], "'mix_kwargs' must have non-empty text keys"),
    ("5000-brackets-in-a-file", f"lr: {DEEP}", [], "nested too deeply"),
    ("5000-brackets-on-the-command-line", "", ["--mix-kwargs", "{a: " * 5000 + "1" + "}" * 5000],
     "nested too deeply"),
    ("kwargs-nested-20-deep", "mix_kwargs: " + "{a: " * 20 + "1" + "}" * 20, [], "nested more than 8"),
    ("kwargs-holding-themselves", "mix_kwargs: &a {a: *a}", [], "nested more than 8"),
    ("kwargs-a-billion-items", "mix_kwargs:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdef", "bcdefg")), [], "'mix_kwargs' holds more than 10000 items"),
    ("empty-layer-name", "mix: catchup\nmix_layers: ['']", [], "'mix_layers' must not hold an empty string"),
    ("empty-model-name", "model: ''", [], "'model' must not be an empty string"),
    ("infinite-mix_alpha", "mix: mixup\nmix_alpha: .inf", [], "'mix_alpha' must be a finite number"),
    ("infinite-cutmix_alpha", "cutmix_alpha: .inf", [], "'cutmix_alpha' must be a finite number"),
    ("infinite-layer-weight", "mix_layers: [0, 1]\nmix_layer_weights: [1, .inf]", [],
     "'mix_layer_weights' must hold finite numbers only"),
    ("infinite-lr", "lr: .inf", [], "'lr' must be a finite number"),
    ("nan-lr-on-the-command-line", "", ["--lr", ".nan"], "'lr' must be a finite number"),
    ("infinite-in-model_kwargs", "model_kwargs: {scale: -.inf}", [], "'model_kwargs' must hold finite numbers only"),
    ("mix_kwargs-repeats-num_classes", "mix: catchup\nmix_kwargs: {num_classes: 10}", [],
     "'mix_kwargs' cannot set 'num_classes'"),
    ("mix_kwargs-repeats-a-mixing-key", "mix_kwargs: {mix_alpha: 2}", [], "use the recipe key 'mix_alpha'"),
    ("mix_kwargs-sets-alpha", "mix_kwargs: {alpha: 2}", [], "use the recipe key 'mix_alpha'"),
    ("model_kwargs-repeats-in_chans", "model_kwargs: {in_chans: 3}", [], "comes from the dataset"),
    ("seed-not-an-int", "seed: 1.5", [], "'seed' expects an int"),
    ("seed-negative", "seed: -1", [], "'seed' must be in [0, 2147483647]"),
    ("seed-2**40", "seed: 1099511627776", [], "'seed' must be in [0, 2147483647]"),
    ("momentum-5", "momentum: 5", [], "'momentum' must be in [0, 1)"),
    ("momentum-1", "", ["--momentum", "1"], "'momentum' must be in [0, 1)"),
    ("step-without-milestones", "sched: step", [], "needs one entry with sched: step"),
    ("erasing-mode", "remode: noise", [], "'remode' must be one of const, rand, pixel"),
    ("flip-probability", "hflip: 1.5", [], "'hflip' must be in [0, 1]"),
]


@pytest.mark.parametrize("text, overrides, message", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_value_gives_one_error_line(tmp_path, capsys, text, overrides, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text + "\n")
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train_script.main(["--config", str(recipe), "--output", str(output), *overrides]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and len(errors[0]) < 600 and not output.exists()


def test_the_built_in_defaults_are_a_valid_recipe(tmp_path, capsys):
    """An empty recipe passes every check train.py makes before it loads torch."""
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing\n")
    args, overrides = train_script.parse_args(["--config", str(recipe), "--output", str(tmp_path / "run")])
    cfg = train_script.load_config(args.config, overrides)
    assert train_script.check_output(cfg, args.resume, args.overwrite) == {}


# argparse's own refusals (usage line + `prog: error:`) come out as the project's one line; the torch-free
# scripts run as processes (a fraction of a second each), the two that import torch at the top in this one
ARGPARSE_CASES = [
    ("train-without-config", ["train.py"], "the following arguments are required: -c/--config"),
    ("train-config-without-value", ["train.py", "--config"], "argument -c/--config: expected one argument"),
    ("evaluate-batch-size-not-a-number", ["evaluate.py", "--batch-size", "x"], "invalid int value: 'x'"),
    ("analysis-without-command", ["-m", "catchup.analysis"], "the following arguments are required: command"),
    ("analysis-steps-not-a-number", ["-m", "catchup.analysis", "filters", "--steps", "x"], "invalid int value"),
    ("config-help-without-action", ["-m", "catchup.config_help"], "one of the arguments --markdown"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in ARGPARSE_CASES], ids=[c[0] for c in ARGPARSE_CASES])
def test_argparse_refusal_is_one_error_line(args, message):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: "), proc.stderr
    assert message in proc.stderr and "(see --help)" in proc.stderr


@pytest.mark.parametrize("module, argv, message", [
    ("catchup.export", [], "python -m catchup.export: the following arguments are required: run, out"),
    ("catchup.sweep", ["--jobs", "x"], "python -m catchup.sweep: argument --jobs: invalid int value: 'x'"),
])
def test_argparse_refusal_of_the_torch_scripts_is_one_error_line(capsys, module, argv, message):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message} (see --help)"]


# python -m catchup.sweep: grid mistakes that would run one point twice or put runs where the table never looks
SWEEP_CASES = [
    ("grid-output", ["--grid", "output=a,b"], "grid key 'output': each run's folder is set by the sweep"),
    ("grid-wandb-group", ["--grid", "wandb-group=a,b"], "grid key 'wandb_group': every run of a sweep"),
    ("grid-repeated-seed", ["--grid", "seed=0,0"], "grid key 'seed' repeats a value: 0,0"),
    ("grid-seed-0-and-00", ["--grid", "seed=0,00"], "'0' and '00' are the same value"),
    ("grid-key-twice", ["--grid", "seed=0", "seed=1"], "grid key 'seed' is given twice"),
    ("grid-momentum-5", ["--grid", "momentum=5"], "'momentum' must be in [0, 1)"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep_gives_one_error_line(tmp_path, capsys, argv, message):
    from catchup.sweep import main
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(["--config", QUICK, *argv, "--output", str(tmp_path / "sweep")]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "sweep").exists()


def test_a_tilde_the_shell_left_is_the_home_folder_in_every_cli(tmp_path, monkeypatch, capsys):
    """`--output=~/x` (or a quoted ~) reaches the scripts unexpanded: a folder literally named `~` would take the
    run, and a sweep's own files would land there while its runs (expanded by train.py) went home."""
    import evaluate
    from catchup.analysis.__main__ import parse_args as analysis_args
    from catchup.export import main as export
    from catchup.sweep import parse_args as sweep_args
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "x").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for name in ("config.yaml", "data_info.json"):          # ~/x holds a run: a plain rerun is refused there
        (home / "x" / name).write_text("{}\n")
    with pytest.raises(SystemExit):
        run_cli(lambda: train_script.main(["--config", str(ROOT / QUICK), "--output=~/x"]))
    assert f"error: {home / 'x'} already holds a run" in capsys.readouterr().err
    assert sweep_args(["--config=~/r.yaml", "--grid", "seed=0", "--output=~/s"])[0].output == home / "s"
    parsed = evaluate.parse_args(["~/a", "--run=~/b", "--output=~/r"])
    assert (parsed.run, parsed.output) == ([home / "a", home / "b"], home / "r")
    assert analysis_args(["filters", "--npz=~/n.npz", "--output=~/f"]).output == str(home / "f")
    with pytest.raises(CatchupError, match=str(home / "nope")):
        export(["~/nope", "~/out"])
    assert list(cwd.iterdir()) == []
