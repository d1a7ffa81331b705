"""The sweep runner: grid parsing and ordering, and a real sweep that is interrupted, resumed and tabulated."""
import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from catchup.errors import CatchupError
from catchup.sweep import Sweep, grid_points, main, parse_grid, run_name, split_values, train_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-kwargs", "{width: 4}", "--batch-size", "32", "--epochs", "3", "--train-fraction", "0.25",
        "--wandb-mode", "disabled", "--workers", "0", "--log-every", "5"]


def test_grid_values_keep_brackets_together():
    assert split_values("none, cutmix,catchup") == ["none", "cutmix", "catchup"]
    assert split_values("[1,2],[3],{a: 1, b: 2}") == ["[1,2]", "[3]", "{a: 1, b: 2}"]
    assert parse_grid(["mix=none,cutmix", "--decay-milestones=[2,3],[4]"]) == {
        "mix": ["none", "cutmix"], "decay_milestones": ["[2,3]", "[4]"]}
    for bad in (["mix"], ["mix=none,,cutmix"], ["mix=[a,b"], ["mix=a", "mix=b"], ["seed=1,1"]):
        with pytest.raises(CatchupError):
            parse_grid(bad)
    for owned in ("output", "experiment", "wandb-group"):     # set by the sweep for every run
        with pytest.raises(CatchupError, match="set by the sweep|W&B group of the sweep"):
            parse_grid([f"{owned}=a,b"])


def test_points_go_seed_by_seed_with_readable_folder_names(tmp_path):
    points = grid_points(parse_grid(["mix=none,cutmix", "seed=0,1", "lr=0.1"]), tmp_path)
    assert [p.name for p in points] == ["mix=none_seed=0_lr=0.1", "mix=cutmix_seed=0_lr=0.1",
                                        "mix=none_seed=1_lr=0.1", "mix=cutmix_seed=1_lr=0.1"]
    assert run_name({"mix_layers": "[0, 2]"}) == "mix_layers=-0--2-"
    # a grid over recipes: each point trains its own, its folder named by the file
    recipes = "configs/cifar100/preactresnet18_none.yaml,configs/cifar100/preactresnet18_cutmix.yaml"
    point = grid_points(parse_grid([f"config={recipes}", "seed=0"]), tmp_path)[1]
    assert point.name == "config=preactresnet18-cutmix_seed=0"
    args = argparse.Namespace(config=None, name="t1")
    assert train_args(args, ["--epochs", "2"], point) == [
        "--config", "configs/cifar100/preactresnet18_cutmix.yaml", "--seed", "0", "--epochs", "2",
        "--wandb-group", "t1", "--output", str(tmp_path / point.name)]
    with pytest.raises(CatchupError, match="same run folder"):
        grid_points(parse_grid(["mix_layers=[0 2],[0/2]"]), tmp_path)


def test_unknown_recipe_keys_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(CatchupError, match="lrr"):
        main(["--config", "configs/quickstart.yaml", "--grid", "lrr=0.1,0.2", "--output", str(tmp_path / "s")])
    with pytest.raises(CatchupError, match="lrr"):
        main(["--config", "configs/quickstart.yaml", "--grid", "seed=0", "--output", str(tmp_path / "s"),
              "--lrr", "0.1"])
    # values that differ as text but not as recipe values would be one run counted twice
    for grid, shown in ((["seed=0,00"], "'0' and '00'"), (["mix=none", "lr=0.1,1e-1"], "'0.1' and '1e-1'")):
        with pytest.raises(CatchupError, match=f"{shown} are the same value"):
            main(["--config", "configs/quickstart.yaml", "--grid", *grid, "--output", str(tmp_path / "s")])
    with pytest.raises(CatchupError, match="not in the array"):
        main(["--config", "configs/quickstart.yaml", "--grid", "seed=0", "--output", str(tmp_path / "s"),
              "--evaluate", "--slurm", "--time", "1:00:00"])
    with pytest.raises(CatchupError, match="--array=0-3 is set by the sweep"):
        main(["--config", "configs/quickstart.yaml", "--grid", "seed=0", "--output", str(tmp_path / "s"),
              "--slurm", "--array=0-3"])
    with pytest.raises(CatchupError, match="either as --config or as the grid key config"):
        main(["--config", "configs/quickstart.yaml", "--grid", "config=configs/quickstart.yaml", "--output",
              str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_each_job_gets_its_own_gpu_and_its_share_of_threads(tmp_path):
    sweep = Sweep(argparse.Namespace(output=tmp_path, threads=4, jobs=2, gpus=["3", "5"]), [], [])
    show = [sys.executable, "-c", "import os, time; time.sleep(1); "
                                  "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"]
    with ThreadPoolExecutor(2) as pool:
        codes = [c for c, _, _ in pool.map(lambda i: sweep.call(show, tmp_path / f"{i}.log"), range(2))]
    assert codes == [0, 0]
    seen = sorted((tmp_path / f"{i}.log").read_text().splitlines()[-1] for i in range(2))
    assert seen == ["3 2", "5 2"]
    assert sorted(sweep.devices.queue) == ["3", "5"]


def _sweep_command(out: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "catchup.sweep", "--config", "configs/quickstart.yaml",
            "--grid", "mix=none,cutmix", "seed=0,1", "--output", str(out), "--jobs", str(jobs), "--threads", str(jobs),
            *TINY]


def _wait_for(condition, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the sweep did not get there in time"
        time.sleep(0.01)


@pytest.mark.slow
def test_sweep_is_interrupted_resumed_and_tabulated(tmp_path):
    out = tmp_path / "sweep"
    runs = out / "runs"
    first, second, third, fourth = (runs / n for n in ("mix=none_seed=0", "mix=cutmix_seed=0", "mix=none_seed=1",
                                                       "mix=cutmix_seed=1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # started as a shell starts `sweep &`: SIGINT ignored, which its children inherit, so only SIGTERM stops them
    proc = subprocess.Popen(_sweep_command(out, jobs=1), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    # interrupt while the second run is between its first checkpoint and its end
    _wait_for(lambda: (first / "results.json").exists() and (second / "checkpoints" / "latest").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "[1/4] mix=none seed=0: done" in output and "interrupted: rerun the same command" in output
    assert not (second / "results.json").exists() and not third.exists()
    finished_first = (first / "results.json").read_bytes()
    # a run killed before its first checkpoint: a config.yaml and nothing else
    third.mkdir()
    shutil.copy(first / "config.yaml", third / "config.yaml")

    resumed = subprocess.run(_sweep_command(out, jobs=2), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout
    assert "sweep: 4 runs (3 to train)" in lines
    assert "mix=none seed=0: already done" in lines
    assert "mix=cutmix seed=0: resumed, done" in lines
    assert "mix=none seed=1: restarted, done" in lines
    assert "mix=cutmix seed=1: done" in lines
    assert (first / "results.json").read_bytes() == finished_first
    assert "resumed from" in (out / "logs" / "mix=cutmix_seed=0.log").read_text()
    assert list(runs.glob("mix=none_seed=1.old-*")), "the stale run should have been moved aside"
    assert json.loads((second / "sweep_time.json").read_text())["attempts"] == 2

    # the table against an independent computation from the runs' results.json
    with (out / "table.csv").open() as f:
        table = {row["mix"]: row for row in csv.DictReader(f)}
    assert set(table) == {"none", "cutmix"}
    for mix in ("none", "cutmix"):
        assert table[mix]["n"] == "2" and table[mix]["seeds"] == "0 1"
        for key, short in (("best_top1", "best"), ("last_top1", "last"), ("median_last10_top1", "median10")):
            values = [json.loads((runs / f"mix={mix}_seed={s}" / "results.json").read_text())[key] for s in (0, 1)]
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (2 - 1))
            assert float(table[mix][f"{short}_mean"]) == pytest.approx(mean, abs=1e-9)
            assert float(table[mix][f"{short}_std"]) == pytest.approx(std, abs=1e-9)
            assert f"{mean:.2f} ± {std:.2f}" in (out / "table.md").read_text()
        times = []
        for s in (0, 1):
            with (runs / f"mix={mix}_seed={s}" / "summary.csv").open() as f:
                times.append(sum(float(r["epoch_time_s"]) for r in csv.DictReader(f)) / 60)
        assert float(table[mix]["train_min_mean"]) == pytest.approx(sum(times) / 2, rel=1e-9)
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --collect rebuilds the same table from the folders without training
    before = (out / "table.csv").read_text()
    (out / "table.csv").unlink()
    collect = subprocess.run([*_sweep_command(out, jobs=1), "--collect"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    assert collect.returncode == 0, collect.stderr
    assert (out / "table.csv").read_text() == before

    # --baseline: cutmix's last top-1 minus none's of the same seed, by hand
    paired = subprocess.run([*_sweep_command(out, jobs=1), "--collect", "--baseline", "mix=none"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert paired.returncode == 0, paired.stderr
    last = {(mix, s): json.loads((runs / f"mix={mix}_seed={s}" / "results.json").read_text())["last_top1"]
            for mix in ("none", "cutmix") for s in (0, 1)}
    diffs = [last["cutmix", s] - last["none", s] for s in (0, 1)]
    mean, std = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
    with (out / "table.csv").open() as f:
        table = {row["mix"]: row for row in csv.DictReader(f)}
    assert float(table["cutmix"]["paired_mean"]) == pytest.approx(mean, abs=1e-9)
    assert float(table["cutmix"]["paired_std"]) == pytest.approx(std, abs=1e-9)
    assert table["cutmix"]["paired_wins"] == f"{sum(d > 0 for d in diffs)}/2" and table["none"]["paired_mean"] == ""
    assert f"{mean:+.2f} ± {std:.2f} ({sum(d > 0 for d in diffs)}/2)" in (out / "table.md").read_text()
    assert "last − none, same seed" in (out / "table.md").read_text()
    assert (out / "table_paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = subprocess.run([*_sweep_command(out, jobs=1), "--collect", "--baseline", "mix=mixup"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--baseline mix=mixup: name a grid key" in refused.stderr


@pytest.mark.slow
def test_evaluate_adds_the_reports_numbers_to_the_table(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "catchup.sweep", "--config", "configs/quickstart.yaml", "--grid", "seed=0",
               "--output", str(out), "--threads", "1", "--evaluate", "--eval-suite", "clean,fgsm",
               "--eval-args", "--batch-size 90", *TINY, "--epochs", "1"]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "runs" / "seed=0" / "eval" / "report.json").read_text())["results"][0]
    with (out / "table.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert float(row["ece_mean"]) == pytest.approx(report["clean"]["ece"], abs=1e-9)
    assert float(row["fgsm_err_4/255_mean"]) == pytest.approx(report["fgsm"]["4/255"]["error"], abs=1e-9)
    assert "fgsm_err_4/255" in (out / "table.md").read_text()


def _finished_run(folder: Path, last: float, code: list[str] | None) -> None:
    folder.mkdir(parents=True)
    results = {"best_top1": last, "last_top1": last, "median_last10_top1": last}
    if code is not None:
        results["provenance"] = {"git_commit": code[0].split("+")[0], "code": code}
    (folder / "results.json").write_text(json.dumps(results))


def test_table_names_the_code_of_its_runs_and_warns_when_they_differ(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--config", "configs/quickstart.yaml", "--grid", "mix=none,cutmix", "seed=0,1", "--output", str(out),
            "--collect", "--wandb-mode", "disabled"]
    for mix in ("none", "cutmix"):
        for seed in (0, 1):
            _finished_run(out / "runs" / f"mix={mix}_seed={seed}", 50.0 + seed, ["a" * 40])
    assert main(args) == 0
    assert f"All 4 runs were made by code {'a' * 40}." in (out / "table.md").read_text()
    assert "warning" not in capsys.readouterr().err
    with (out / "runs.csv").open() as f:
        assert {row["code"] for row in csv.DictReader(f)} == {"a" * 40}

    # one run from other code, one resumed from a dirty tree, one older than provenance
    shutil.rmtree(out / "runs")
    _finished_run(out / "runs" / "mix=none_seed=0", 50.0, ["a" * 40])
    _finished_run(out / "runs" / "mix=cutmix_seed=0", 51.0, ["b" * 40])
    _finished_run(out / "runs" / "mix=none_seed=1", 52.0, ["a" * 40, "a" * 40 + "+dirty"])
    _finished_run(out / "runs" / "mix=cutmix_seed=1", 53.0, None)
    assert main(args) == 0
    note = (out / "table.md").read_text().splitlines()[-1]
    assert note.startswith("WARNING: this table mixes runs of 4 code versions")
    assert f"{'b' * 40} (1 run: mix=cutmix_seed=0)" in note and "unknown (1 run: mix=cutmix_seed=1)" in note
    assert f"{'a' * 40} (2 runs: mix=none_seed=0, mix=none_seed=1)" in note and "+dirty (1 run" in note
    assert capsys.readouterr().err.startswith("WARNING: this table mixes runs of 4 code versions")

    for run in (out / "runs").iterdir():     # runs older than provenance only
        _finished_run(run.with_name(run.name + "-old"), 50.0, None)
        shutil.rmtree(run)
        run.with_name(run.name + "-old").rename(run)
    assert main(args) == 0
    assert "None of the 4 runs records its code" in (out / "table.md").read_text()
