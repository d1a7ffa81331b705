"""benchmarks/overhead.py end to end on a tiny setting, in process, and its timing/memory helpers."""
import json
import math
from pathlib import Path

import pytest
import torch

from catchup import CatchupError
from catchup.mix import MIXERS
from tests.helpers import load_benchmark as load

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

@pytest.fixture(scope="module")
def overhead():
    return load("overhead")


@pytest.fixture(scope="module")
def timing():
    return load("_timing")


@pytest.fixture(scope="module")
def tiny_run(overhead, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "overhead.json"
    threads = torch.get_num_threads()
    try:
        returned = overhead.main(["--model", "test_resnet", "--batch-size", "4", "--input-size", "16", "--repeats", "1",
                                  "--warmup", "0", "--op-repeats", "1", "--threads", "1", "--device", "cpu",
                                  "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    return returned, json.loads(out.read_text())


def test_json_has_every_registered_method_with_positive_ratios(tiny_run):
    returned, data = tiny_run
    assert returned == data
    methods = {k for k in data if not k.startswith("_")}
    assert methods == set(MIXERS)
    assert data["none"]["ratio"] == 1.0 and data["none"]["peak_mem_ratio"] == 1.0
    for name in methods:
        row = data[name]
        assert row["step_s"] > 0 and row["peak_mem_mb"] > 0
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert math.isfinite(row["peak_mem_ratio"]) and row["peak_mem_ratio"] > 0
        assert row["ratio"] == pytest.approx(row["step_s"] / data["none"]["step_s"])
    assert data["catchup"]["layers"] == ["input", "act1", "layer1", "layer2", "layer3", "layer4"]
    meta = data["_meta"]
    assert (meta["model"], meta["batch"], meta["input"], meta["threads"]) == ("test_resnet", 4, 16, 1)
    assert meta["torch"] == torch.__version__ and meta["cpu_count"] >= 1


def test_catchup_is_measured_at_each_layer_and_its_peak_is_the_worst_layer(tiny_run):
    _, data = tiny_run
    per_layer = data["_catchup_per_layer"]
    assert list(per_layer) == [f"catchup@{k}" for k in range(6)]
    assert [row["layers"] for row in per_layer.values()] == [[m] for m in data["catchup"]["layers"]]
    # Memory is deterministic for a given layer, so the sampled method's peak is the largest single-layer one.
    worst = max(row["step_peak_mem_mb"] for row in per_layer.values())
    assert data["catchup"]["step_peak_mem_mb"] == pytest.approx(worst, rel=1e-3)
    # Mixing only adds tensors to a step, never removes any.
    assert all(row["step_peak_mem_mb"] >= data["none"]["step_peak_mem_mb"] for row in per_layer.values())


def test_feature_op_table_covers_every_stage(tiny_run):
    _, data = tiny_run
    rows = data["_feature_op"]
    assert [r["stage"] for r in rows] == data["catchup"]["layers"][1:]
    assert rows[0]["shape"][:2] == [4, 32]
    for r in rows:
        assert r["stage_fwd_ms"] > 0 and r["catchup_fwd+bwd_ms"] > 0 and r["fwd_bwd_step_pct"] > 0


def test_unknown_method_and_bad_settings_are_clear_errors(overhead):
    with pytest.raises(CatchupError, match="unknown 'catchupp'|unknown catchupp"):
        overhead.parse_args(["--methods", "catchupp"])
    with pytest.raises(CatchupError, match="batch-size"):
        overhead.parse_args(["--batch-size", "1"])
    args = overhead.parse_args(["--methods", "catchup", "--quick"])
    assert args.methods == ["none", "catchup"] and args.repeats == overhead.QUICK["repeats"]


def test_cpu_peak_follows_allocations_and_frees(timing):
    def step():
        a = torch.empty(1_000_000)           # 4 MB
        b = torch.empty(500_000)             # +2 MB -> 6 MB
        del a                                # 2 MB
        c = torch.empty(2_000_000)           # +8 MB -> 10 MB: the peak
        del b, c

    assert timing.step_peak_bytes(step, torch.device("cpu")) == 10_000_000


def test_interleaving_is_round_robin_with_a_rotating_start(timing):
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = timing.interleaved_times(fns, 3, torch.device("cpu"))
    assert calls == list("abc" "bca" "cab")
    assert all(len(v) == 3 and all(wall >= 0 and cpu >= 0 for wall, cpu in v) for v in times.values())


def test_every_benchmark_script_ends_through_run_cli():
    """The benchmarks report a user error as the scripts do (catchup.cli.run_cli), not with a wrapper of their own."""
    scripts = [p for p in sorted(BENCHMARKS.glob("*.py")) if not p.name.startswith("_")]
    assert len(scripts) >= 6
    for path in scripts:
        source = path.read_text()
        assert source.rstrip().endswith('if __name__ == "__main__":\n    run_cli(main)'), path.name
        assert "except CatchupError" not in source and 'sys.exit(f"error' not in source, path.name
