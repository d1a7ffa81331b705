"""benchmarks/gpu_check.py at toy sizes on CPU: every section runs and the JSON and Markdown agree."""
import json
import math
import re

import pytest
import torch

from tests.helpers import load_benchmark as load


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu_and_writes_json_and_markdown(tmp_path):
    gpu_check = load("gpu_check")
    threads = torch.get_num_threads()
    try:
        result = gpu_check.main(["--tiny", "--backend", "eager", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data == json.loads(json.dumps(result))
    rows, summary = data["compile"]["rows"], data["compile"]["summary"]
    assert set(rows) == {"none eager", "none compiled", "catchup eager", "catchup compiled",
                         "catchup compiled, regions", "none compiled, catchup's regions"}
    assert summary["graphs_compiled_after_warmup"] == 0
    assert rows["catchup compiled"]["graphs"] == rows["none compiled"]["graphs"] == 1    # every layer, one graph
    assert summary["catchup_vs_none_compiled"] == rows["catchup compiled"]["step_s"] / rows["none compiled"]["step_s"]
    assert all(math.isfinite(r["step_s"]) and r["step_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows.values())
    layers = [k for k in data["per_layer"] if "@" in k]
    assert layers == [f"catchup@{k}" for k in range(6)]
    assert data["engine_vs_bare"]["ratio"] > 0
    meta = data["_meta"]
    assert (meta["model"], meta["amp"], meta["channels_last"], meta["backend"]) == ("test_resnet", "bf16", True, "eager")
    md = (tmp_path / "gpu_check.md").read_text()
    assert f"| {summary['catchup_vs_none_eager']:.3f} | {summary['catchup_vs_none_compiled']:.3f} |" in md
    assert [line.split("|")[1].strip() for line in md.splitlines() if re.match(r"\| \d \(", line)] == [
        f"{k} ({name})" for k, name in enumerate(["input", "act1", "layer1", "layer2", "layer3", "layer4"])]
