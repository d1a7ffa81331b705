"""The committed benchmark evidence stands on its own: each sweep folder's table is rebuilt from its run files by the
sweep's own command with --collect, every run was made by one clean commit, today's recipe still resolves to the
configs the runs used, and the README quotes the tables it rests on."""
import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from catchup.config import config_to_dict, load_config
from catchup.mix import MIXERS
from catchup.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "docs" / "evidence" / "fashion_mnist"
SWEEPS = sorted(p.parent for p in EVIDENCE.glob("*/sweep.json"))
README = (ROOT / "README.md").read_text()


def recorded_argv(folder: Path, output: Path) -> list[str]:
    """The sweep's recorded command line (after `python -m catchup.sweep`) with its --output moved."""
    argv = json.loads((folder / "sweep.json").read_text())["command"][3:]
    at = argv.index("--output")
    return [*argv[:at + 1], str(output), *argv[at + 2:]]


def runs_of(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "runs").iterdir() if p.is_dir())


def test_the_evidence_is_there():
    assert {p.name for p in SWEEPS} >= {"benchmark", "five_seeds", "ablation_catchup_alpha",
                                        "ablation_catchup_label", "ablation_cutmix_prob"}


@pytest.mark.parametrize("folder", SWEEPS, ids=lambda p: p.name)
def test_collect_rebuilds_the_committed_table(folder, tmp_path, monkeypatch):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    for name in ("table.md", "table.csv", "runs.csv"):
        (copy / name).unlink()
    monkeypatch.chdir(ROOT)
    assert sweep_main([*recorded_argv(folder, copy), "--collect"]) == 0
    for name in ("table.md", "table.csv", "runs.csv"):
        assert (copy / name).read_text() == (folder / name).read_text(), name


def test_every_run_was_made_by_one_clean_commit_named_in_the_readme():
    commits = set()
    for folder in SWEEPS:
        for run in runs_of(folder):
            provenance = json.loads((run / "results.json").read_text())["provenance"]
            assert provenance["git_dirty"] is False, run
            commits.update(provenance["code"])
    assert len(commits) == 1, commits
    assert f"commit {next(iter(commits))[:7]}" in README


@pytest.mark.parametrize("folder", SWEEPS, ids=lambda p: p.name)
def test_todays_recipe_resolves_to_the_runs_configs(folder, monkeypatch):
    """Documentation may change after the runs; what a run trains with may not (else rerun the evidence)."""
    monkeypatch.chdir(ROOT)
    argv = json.loads((folder / "sweep.json").read_text())
    for run in runs_of(folder):
        made = yaml.safe_load((run / "config.yaml").read_text())
        command = shlex.split(json.loads((run / "results.json").read_text())["provenance"]["command"])
        overrides = [a for a in command[command.index("--config") + 2:] if a not in ("--resume", "--overwrite")]
        today = config_to_dict(load_config(argv["config"], overrides))
        assert {k: v for k, v in today.items() if k != "output"} == \
            {k: v for k, v in made.items() if k != "output"}, run


def markdown_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def test_the_readme_quotes_the_benchmark_table_and_each_ablation():
    for row in markdown_rows((EVIDENCE / "benchmark" / "table.md").read_text()):
        assert row in README, row
    for name in ("ablation_catchup_alpha", "ablation_catchup_label", "ablation_cutmix_prob", "five_seeds"):
        rows = markdown_rows((EVIDENCE / name / "table.md").read_text())
        compared = rows[2:]                      # after the header and the baseline's own row
        paired = [re.search(r"([+-]\d+\.\d+ ± \d+\.\d+ \(\d+/\d+\)) \|$", row) for row in compared]
        assert paired and all(paired), name
        for match in paired:
            assert match.group(1) in README, (name, match.group(1))


def test_runs_of_one_config_in_different_sweeps_agree_to_the_last_digit():
    """Sweeps share no runs: a run of the same recipe in two folders was trained twice and must match in every
    loss, learning rate and top-1 (training on the CPU is deterministic), which is what makes a rerun regenerate
    a table."""
    by_config: dict[str, list[Path]] = {}
    for folder in SWEEPS:
        for run in runs_of(folder):
            config = yaml.safe_load((run / "config.yaml").read_text())
            config.pop("output")
            method = MIXERS[config["mix"]]           # a method's default, given or not, is one recipe
            config["mix_alpha"] = float(config["mix_alpha"] or method.default_alpha)
            config["mix_prob"] = float(config["mix_prob"] or method.default_prob)
            by_config.setdefault(json.dumps(config, sort_keys=True), []).append(run)
    timing = {"images_per_s", "epoch_time_s"}

    def numbers(run: Path) -> list[dict[str, str]]:
        with (run / "summary.csv").open() as f:
            return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(f)]

    twice = [runs for runs in by_config.values() if len(runs) > 1]
    assert len(twice) >= 3 + 5 + 5     # no mixing at seeds 0-2, CutMix and Catch-up Mix at seeds 0-4
    for first, *others in twice:
        for other in others:
            assert numbers(other) == numbers(first), (first, other)
