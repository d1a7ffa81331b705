"""engine.evaluate under two processes counts each evaluation sample once, as a plain loop over the set does."""
import json
from pathlib import Path

import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N, CLASSES = 7, 3     # 7 samples in batches of 2 per process: the last batch is uneven and padded


def _data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return torch.randn(N, 4, generator=g), torch.randint(0, CLASSES, (N,), generator=g), model


def _two_process_eval(out: str) -> None:
    from accelerate import Accelerator

    from catchup.engine import evaluate
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    x, y, model = _data()
    model, loader = accelerator.prepare(model, DataLoader(TensorDataset(x, y), batch_size=2))
    metrics = evaluate(model, loader, accelerator)
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(metrics))


def test_evaluate_counts_each_sample_once_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        debug_launcher(_two_process_eval, args=(str(tmp_path / "m.json"),), num_processes=2)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    metrics = json.loads((tmp_path / "m.json").read_text())
    x, y, model = _data()
    with torch.no_grad():      # the plain single-process answer
        logits = model(x)
    top1 = 100.0 * (logits.argmax(1) == y).double().mean().item()
    nll = nn.functional.cross_entropy(logits.double(), y).item()
    assert metrics["n"] == N
    assert abs(metrics["top1"] - top1) < 1e-9 and abs(metrics["loss"] - nll) < 1e-5
