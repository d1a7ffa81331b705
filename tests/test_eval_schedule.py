"""Evaluating at a few epochs only (eval_every, eval_last, always the final epoch), and results.json's top-1
summaries computed over the evaluated epochs alone."""
import csv
import json

import pytest

from catchup.engine import eval_due, summarize_top1
from tests.helpers import run_train


def test_schedule_is_every_n_plus_the_last_epochs_plus_the_final_one():
    def due(epochs, every, last):
        return [e + 1 for e in range(epochs) if eval_due(e, epochs, every, last)]
    assert due(80, 40, 3) == [40, 78, 79, 80]
    assert due(10, 1, 0) == list(range(1, 11))
    assert due(10, 4, 0) == [4, 8, 10]
    assert due(5, 100, 2) == [4, 5]


def test_median_of_last_10_uses_only_evaluations_inside_the_last_10_epochs():
    history = [{"epoch": e} for e in range(80)]
    for epoch, top1 in ((39, 90.0), (77, 70.0), (78, 72.0), (79, 71.0)):
        history[epoch]["eval_top1"] = top1
    summary = summarize_top1(history)
    # epoch 40's 90 % is the best evaluation but not one of the last 10 epochs
    assert summary == {"best_top1": 90.0, "last_top1": 71.0, "median_last10_top1": 71.0, "evaluations": 4,
                       "median_last10_evals": 3}
    every_epoch = [{"epoch": e, "eval_top1": float(e)} for e in range(20)]
    assert summarize_top1(every_epoch)["median_last10_top1"] == pytest.approx(14.5)   # median of 10..19
    assert summarize_top1(every_epoch)["median_last10_evals"] == 10


def test_a_run_evaluates_only_on_its_schedule(tmp_path):
    out = tmp_path / "sparse"
    run_train(out, "--epochs", "4", "--eval-every", "3", "--eval-last", "1", "--mix", "none")
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows if r["eval_top1"]] == ["2", "3"]
    results = json.loads((out / "results.json").read_text())
    assert results["evaluations"] == 2 and results["median_last10_evals"] == 2
    assert results["best_top1"] == max(float(r["eval_top1"]) for r in rows if r["eval_top1"])
