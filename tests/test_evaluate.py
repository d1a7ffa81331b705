"""evaluate.py end to end on a tiny digits run (and a hand-made CIFAR-10 run for the corruption suite);
every number is checked against a plain recomputation with the loaded model."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from sklearn.datasets import load_digits

from catchup.config import dump_config, load_config
from catchup.data import build_datasets
from catchup.errors import CatchupError
from catchup.runs import build_model, load_run, save_weights
from tests.helpers import run_train, wandb_records
from tests.fixtures_data import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FAST = ["--batch-size", "28", "--workers", "0"]  # 360 digits test images: 12 full batches and one of 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("evaluate") / "digits"
    run_train(out, "--epochs", "1", "--model-ema", "true", "--model-ema-decay", "0.5")
    return out


def evaluate(*argv) -> Path:
    import evaluate as script
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return script.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def digits_eval(run: Path, weights: str = "final"):
    """The loaded model and the whole digits eval set as one batch, read item by item."""
    loaded = load_run(run, weights)
    _, eval_set, info = build_datasets("digits", None, train_transform=False)
    xs, ys = zip(*(eval_set[i] for i in range(len(eval_set))))
    return loaded.model, torch.stack(xs), torch.tensor(ys), info


def files_outside_eval(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.relative_to(run).parts[0] != "eval"}


# ---------------------------------------------------------------- one run, the default suites

def test_report_numbers_match_a_plain_recomputation(run_dir):
    before = files_outside_eval(run_dir)
    out = evaluate("--run", run_dir, "--suite", "all", "--fgsm-eps", "0,4/255", *FAST)
    assert out == run_dir / "eval" and files_outside_eval(run_dir) == before
    for name in ("report.json", "report.md", "reliance_curves.png", "deformations.png", "reliability_digits_final.png"):
        assert (out / name).read_bytes()[:4] == (b"\x89PNG" if name.endswith(".png") else (out / name).read_bytes()[:4])
    report = read_report(out)
    assert report["meta"]["suites"] == ["clean", "fgsm", "deformation", "reliance"]
    assert set(report["meta"]["skipped"]) == {"corruption", "ood"}
    (row,) = report["results"]
    assert (row["weights"], row["dataset"], row["n"]) == ("final", "digits", 360)

    model, x, y, _ = digits_eval(run_dir)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 1]) for i in range(len(x))])  # one image at a time
    top1 = 100.0 * sum(int(row_.argmax()) == t for row_, t in zip(logits, y.tolist())) / len(y)
    top5 = 100.0 * sum(t in row_.topk(5).indices.tolist() for row_, t in zip(logits, y.tolist())) / len(y)
    nll = -sum(float(row_.log_softmax(0)[t]) for row_, t in zip(logits, y.tolist())) / len(y)
    clean = row["clean"]
    assert clean["n"] == 360
    assert clean["top1"] == pytest.approx(top1) and clean["top1_err"] == pytest.approx(100 - top1)
    assert clean["top5"] == pytest.approx(top5) and clean["nll"] == pytest.approx(nll, rel=1e-4)
    assert row["fgsm"]["0"]["error"] == pytest.approx(100 - top1)  # a zero step changes nothing
    assert 0 <= row["fgsm"]["4/255"]["error"] <= 100

    assert list(row["deformation"]) == ["rotate_20", "rotate_40", "shear_28.6", "shear_57.2",
                                        "zoom_60", "zoom_80", "zoom_120", "zoom_140"]
    rel = row["reliance"]
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        head = model.get_classifier()
        d = feats.shape[1]
        k = round(0.1 * d)
        dropped = feats.scatter(1, feats.topk(k, dim=1).indices, 0.0)
        acc10 = float((head(dropped).argmax(1) == y).double().mean() * 100)
        acc_all_dropped = float((head(torch.zeros(1, d)).argmax(1) == y).double().mean() * 100)
    assert rel["num_features"] == d and len(rel["largest_first"]) == len(rel["fractions"]) == 21
    assert rel["acc_drop10"] == pytest.approx(acc10)
    assert rel["largest_first"][0] == pytest.approx(top1) == rel["smallest_first"][0]
    assert rel["largest_first"][-1] == pytest.approx(acc_all_dropped)
    mass = feats.sort(dim=1, descending=True).values.cumsum(1) / feats.sum(1, keepdim=True)
    needed = [int((m < 0.5 - 1e-9).sum()) + 1 for m in mass]
    assert rel["mass_share_50"] == pytest.approx(100 * np.mean(needed) / d)

    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Run | Weights | Top-1 Err"))
    assert "FGSM Err 4/255" in header and "Rot ±20°" in header and "Acc @10% drop" in header
    assert f"| digits | final | {100 - top1:.2f} |" in md
    assert "corruption skipped: no --corruption-dir given" in md


def test_deformations_report_mean_and_std_over_draws(run_dir, tmp_path):
    single = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--deform-draws", "1",
                                  "--output", tmp_path / "one", *FAST))["results"][0]
    report = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--deform-draws", "3",
                                  "--output", tmp_path / "three", *FAST))
    row = report["results"][0]
    assert report["meta"]["deform_draws"] == 3 and report["meta"]["deform_centre"] == "true"
    for name, draws in row["deformation_draws"].items():
        assert len(draws) == (1 if name.startswith("zoom") else 3)
        assert draws[0] == single["deformation"][name]     # the first draw is the one-draw run's
        mean = sum(draws) / len(draws)
        std = math.sqrt(sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)) if len(draws) > 1 else 0.0
        assert row["deformation"][name] == pytest.approx(mean) and row["deformation_std"][name] == pytest.approx(std)
    assert any(len(set(d)) > 1 for d in row["deformation_draws"].values())
    md = (tmp_path / "three" / "report.md").read_text()
    rotate = f"{row['deformation']['rotate_40']:.2f} ± {row['deformation_std']['rotate_40']:.2f}"
    assert "over 3 draws" in md and rotate in md


def test_keras_centre_deformation_matches_scipy_about_size_over_2_plus_half(run_dir, tmp_path):
    from scipy import ndimage
    row = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--deform-centre", "keras",
                               "--deform-draws", "1", "--output", tmp_path / "keras", *FAST))["results"][0]
    model, x, y, _ = digits_eval(run_dir)
    h, w = x.shape[-2:]
    centre = np.array([h / 2 + 0.5, w / 2 + 0.5])
    for name, zoom in (("zoom_60", 0.6), ("zoom_140", 1.4)):
        m = np.eye(2) * zoom
        warped = np.stack([[ndimage.affine_transform(ch, m, offset=centre - m @ centre, order=0, mode="grid-constant",
                                                     cval=0.0) for ch in img] for img in x.double().numpy()])
        with torch.no_grad():
            logits = model(torch.from_numpy(warped).float())
        assert row["deformation"][name] == pytest.approx(float((logits.argmax(1) == y).double().mean() * 100))


def test_deformations_are_seeded(run_dir, tmp_path):
    a = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--output", tmp_path / "a", *FAST))
    b = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--output", tmp_path / "b", *FAST))
    c = read_report(evaluate("--run", run_dir, "--suite", "deformation", "--seed", "1", "--output", tmp_path / "c",
                             *FAST))
    da, db, dc = (r["results"][0]["deformation"] for r in (a, b, c))
    assert da == db
    # zooms are fixed, rotations and shears random: another seed moves at least one of the random ones
    assert all(da[k] == dc[k] for k in da if k.startswith("zoom"))
    assert any(da[k] != dc[k] for k in da if not k.startswith("zoom"))


def test_two_runs_and_both_weights(run_dir, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    out = evaluate("--run", run_dir, "--run", other, "--output", tmp_path / "both", "--weights", "both",
                   "--suite", "clean", *FAST)
    rows = read_report(out)["results"]
    assert [(r["label"], r["weights"]) for r in rows] == [("digits", "final"), ("digits", "ema"),
                                                          ("copy", "final"), ("copy", "ema")]
    assert rows[0]["clean"] == rows[2]["clean"] and rows[1]["clean"] == rows[3]["clean"]
    model, x, y, _ = digits_eval(run_dir, "ema")
    with torch.no_grad():
        assert rows[1]["clean"]["top1"] == pytest.approx(float((model(x).argmax(1) == y).double().mean() * 100))
    summary = (out / "report.md").read_text().split("## Summary")[1].split("## Clean")[0]
    assert len([line for line in summary.splitlines() if line.startswith("| digits") or line.startswith("| copy")]) == 4


# ---------------------------------------------------------------- OOD

def _manual_ood(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    """FPR95, AUROC (pairwise definition) and AUPR (precision summed over distinct thresholds), OOD positive."""
    auroc = np.mean([(o > i) + 0.5 * (o == i) for o in scores_out for i in scores_in])
    caught = np.sort(scores_out)[::-1][math.ceil(0.95 * len(scores_out)) - 1]  # highest t catching >= 95 %
    fpr = np.mean(scores_in >= caught)
    ap, recall_before = 0.0, 0.0
    for t in np.unique(np.concatenate([scores_in, scores_out]))[::-1]:
        tp, fp = (scores_out >= t).sum(), (scores_in >= t).sum()
        recall = tp / len(scores_out)
        ap += (recall - recall_before) * tp / (tp + fp)
        recall_before = recall
    return {"fpr95": 100 * fpr, "auroc": 100 * auroc, "aupr": 100 * ap}


def test_ood_on_a_folder_of_images(run_dir, tmp_path):
    folder = tmp_path / "ood" / "noise"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    digits = load_digits().images[:12]  # in-distribution-like images make the scores overlap
    pictures = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    pictures += [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(3)]  # resized to 8x8
    pictures += [np.repeat((d * 255 / 16).astype(np.uint8)[..., None], 3, axis=2) for d in digits]
    paths = [folder / ("sub" if i % 2 else "") / f"{i}.png" for i in range(len(pictures))]
    for path, picture in zip(paths, pictures):
        Image.fromarray(picture).save(path)
    (tmp_path / "classes.txt").write_text("0\n1\n2\n")
    plain = read_report(evaluate("--run", run_dir, "--suite", "ood", "--ood-dir", folder, "--output",
                                 tmp_path / "a", *FAST))["results"][0]["ood"]
    masked = read_report(evaluate("--run", run_dir, "--suite", "ood", "--ood-dir", folder, "--ood-classes",
                                  tmp_path / "classes.txt", "--output", tmp_path / "b", *FAST))["results"][0]["ood"]

    model, x, y, info = digits_eval(run_dir)
    mean, std = info.mean[0], info.std[0]
    images = []
    for path in paths:
        img = Image.open(path).convert("RGB").convert("L")
        img = img.resize((8, 8), Image.BILINEAR) if img.size != (8, 8) else img
        images.append((torch.tensor(np.asarray(img), dtype=torch.float32) / 255 - mean) / std)
    with torch.no_grad():
        logits_in, logits_out = model(x), model(torch.stack(images)[:, None])
    msp = lambda z: -z.softmax(1).max(1).values.double().numpy()  # noqa: E731
    expected = _manual_ood(msp(logits_in), msp(logits_out))
    assert 0 < expected["fpr95"] and 50 < expected["auroc"] < 100  # neither trivial nor hopeless
    assert plain["sets"]["noise"]["n_ood"] == 18 and plain["n_in"] == 360 and plain["classes"] is None
    for key, value in expected.items():
        assert plain[key] == pytest.approx(value) == plain["sets"]["noise"][key]
    keep = y < 3
    expected = _manual_ood(msp(logits_in[keep][:, :3]), msp(logits_out[:, :3]))
    assert masked["n_in"] == int(keep.sum()) and masked["classes"] == 3
    for key, value in expected.items():
        assert masked[key] == pytest.approx(value)


# ---------------------------------------------------------------- corruption (a hand-made CIFAR-10 run)

@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "data", per_batch=2, n_test=6)
    cfg = load_config(ROOT / "configs/quickstart.yaml", {"dataset": "cifar10", "data_dir": str(root / "data"),
                                                         "model_kwargs": {"width": 4}, "output": str(root / "run")})
    (root / "run").mkdir()
    dump_config(cfg, root / "run" / "config.yaml")
    _, _, info = build_datasets("cifar10", cfg.data_dir, train_transform=False)
    torch.manual_seed(0)
    model = build_model(cfg, info)
    # a freshly initialised net predicts one class for every image; a few steps on random images vary its answers
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 10
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    save_weights(model, root / "run" / "model.safetensors")
    return root / "run"


def write_cifar_c(folder: Path, names=("gaussian_noise", "brightness"), n=6, side=32, seed=0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {name: rng.integers(0, 256, (5 * n, side, side, 3), dtype=np.uint8) for name in names}
    for name, arr in data.items():
        np.save(folder / f"{name}.npy", arr)
    labels = rng.integers(0, 10, 5 * n).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    return {"data": data, "labels": labels}


def test_corruption_suite_on_cifar_c_files(cifar_run, tmp_path):
    fixture = write_cifar_c(tmp_path / "c")
    out = evaluate("--run", cifar_run, "--suite", "corruption", "--corruption-dir", tmp_path / "c",
                   "--output", tmp_path / "out", "--batch-size", "7", "--workers", "0")
    corr = read_report(out)["results"][0]["corruption"]
    model = load_run(cifar_run).model
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = {}
    for name, arr in fixture["data"].items():
        for s in range(1, 6):
            rows = slice(6 * (s - 1), 6 * s)
            x = (torch.from_numpy(arr[rows]).permute(0, 3, 1, 2).float() / 255 - mean) / std
            with torch.no_grad():
                pred = model(x).argmax(1).numpy()
            expected[(name, s)] = 100 - 100 * np.mean(pred == fixture["labels"][rows])
    for (name, s), err in expected.items():
        assert corr["errors"][name][str(s)] == pytest.approx(err)
    assert corr["mce_all"] == pytest.approx(np.mean(list(expected.values())))
    assert corr["mce_15"] is None  # two of the 15 standard corruptions: no standard mCE
    assert corr["n_per_slice"] == 6
    assert (out / "corruption_run_final.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gaussian_noise |" in (out / "report.md").read_text()


# ---------------------------------------------------------------- errors

def test_input_errors_are_catchup_errors(run_dir, cifar_run, tmp_path):
    no_ema = tmp_path / "no_ema"
    shutil.copytree(run_dir, no_ema, ignore=shutil.ignore_patterns("eval", "checkpoints", "model_ema.safetensors"))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    wide = tmp_path / "wide"
    shutil.copytree(no_ema, wide)
    (wide / "config.yaml").write_text((wide / "config.yaml").read_text().replace("width: 4", "width: 8"))
    write_cifar_c(tmp_path / "c28", side=28)
    (tmp_path / "ood").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ood" / "black.png")
    (tmp_path / "c.txt").write_text("3\n10\n")
    write_cifar_c(tmp_path / "c100", names=("fog",))
    np.save(tmp_path / "c100" / "labels.npy", np.arange(30, dtype=np.uint8) + 70)
    cases = [
        (["--run", no_config], "no config.yaml"),
        (["--run", no_ema, "--weights", "ema"], "no EMA weights"),
        (["--run", no_ema, "--weights", "both"], "no EMA weights"),
        (["--run", wide], "do not fit model"),
        (["--run", run_dir, "--suite", "clean,robust"], "unknown suite 'robust'"),
        (["--run", run_dir, "--fgsm-eps", "4/two"], "--fgsm-eps"),
        (["--run", run_dir, "--fgsm-eps", "2"], "outside [0, 1]"),
        (["--run", run_dir, "--run", no_ema], "pass --output"),
        (["--run", run_dir, "--suite", "corruption"], "needs --corruption-dir"),
        (["--run", run_dir, "--suite", "clean,ood"], "needs --ood-dir"),
        (["--run", run_dir, "--output", no_ema], "lies in the run folder"),
        (["--run", run_dir, "--output", no_ema / "reports"], "lies in the run folder"),
        (["--run", run_dir, "--suite", "corruption", "--corruption-dir", tmp_path / "c28"], "trained on digits"),
        (["--run", cifar_run, "--suite", "corruption", "--corruption-dir", tmp_path / "c28"], "expects 32x32"),
        (["--run", cifar_run, "--suite", "corruption", "--corruption-dir", tmp_path / "c100"], "10 classes"),
        (["--run", run_dir, "--suite", "ood", "--ood-dir", tmp_path / "nowhere"], "does not exist"),
        (["--run", run_dir, "--suite", "ood", "--ood-dir", no_config], "holds no images"),
        (["--run", run_dir, "--suite", "ood", "--ood-dir", tmp_path / "ood", "--ood-classes", tmp_path / "c.txt"],
         "outside 0..9"),
    ]
    for argv, message in cases:
        with pytest.raises(CatchupError) as err:
            evaluate(*argv, *FAST)
        assert message in str(err.value) and "\n" not in str(err.value), (argv, str(err.value))
    assert not (no_config / "eval").exists()


def test_cli_errors_exit_2_with_one_line(tmp_path, cifar_run):
    write_cifar_c(tmp_path / "bad")
    (tmp_path / "bad" / "brightness.npy").write_bytes(b"\x93NUMPY not really")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for args, message in [
        (["--run", str(tmp_path / "missing")], "no such run folder"),
        (["--run", str(cifar_run), "--suite", "corruption", "--corruption-dir", str(tmp_path / "bad"),
          "--workers", "0"], "brightness"),
    ]:
        proc = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


# ---------------------------------------------------------------- two processes, W&B

def _two_process_main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    import evaluate as script
    script.main(argv)


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(run_dir, cifar_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_cifar_c(tmp_path / "c", n=7)  # 7 images a slice: the slices straddle the batches of 4 per process
    jobs = {"digits": ([str(run_dir), "--suite", "clean,fgsm,deformation,reliance", *FAST],
                       ("clean", "fgsm", "deformation", "reliance")),
            "cifar": ([str(cifar_run), "--suite", "clean,corruption", "--corruption-dir", str(tmp_path / "c"),
                       "--batch-size", "4", "--workers", "0"], ("clean", "corruption"))}
    for name, (argv, suites) in jobs.items():
        one = read_report(evaluate(*argv, "--output", tmp_path / name / "one"))
        AcceleratorState._reset_state(True)
        debug_launcher(_two_process_main, args=([*argv, "--output", str(tmp_path / name / "two")],), num_processes=2)
        two = read_report(tmp_path / name / "two")
        assert one["meta"]["num_processes"] == 1 and two["meta"]["num_processes"] == 2
        (a,), (b,) = one["results"], two["results"]
        assert b["clean"]["n"] == a["n"]  # the padding that evens out the last batches is dropped
        for suite in suites:  # same samples in the same order: the same floats
            assert b[suite] == a[suite], (name, suite)


def test_wandb_resumes_the_runs_own_id(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "tracked"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    (run / "wandb_run_id.txt").write_text("evalrun0001\n")
    out = evaluate("--run", run, "--suite", "clean", "--wandb", *FAST)
    (file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(file))
    assert next(r.run for r in records if r.HasField("run")).run_id == "evalrun0001"
    logged = {(i.key or "/".join(i.nested_key)): i.value_json for r in records if r.HasField("history")
              for i in r.history.item}
    top1 = read_report(out)["results"][0]["clean"]["top1"]
    assert json.loads(logged["eval/final/clean/top1"]) == pytest.approx(top1)
    assert json.loads(logged["eval/final/plots/reliability/_type"]) == "image-file"
