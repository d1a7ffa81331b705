"""Gradient accumulation with an odd number of micro-batches: Accelerate also steps after the last, partial
accumulation, so an epoch has ceil(micro-batches / accumulation) optimizer steps; the schedule, max_steps and
a resumed run agree with that count."""
import json
import math

import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

from catchup.data import build_datasets
from catchup.runs import latest_checkpoint
from tests.helpers import load_safetensors, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

# batch 34 = 2 micro-batches of 17; digits at train_fraction 0.25 gives an odd number of them per epoch
RECIPE = ("--batch-size", "34", "--grad-accum-steps", "2", "--epochs", "2", "--mix", "catchup",
          "--sched", "cosine", "--lr", "0.1", "--warmup-epochs", "1", "--warmup-lr", "1e-5", "--min-lr", "0")


@pytest.fixture
def lr_trace():
    """The learning rate of every optimizer step actually taken, in order."""
    trace = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: trace.append(opt.param_groups[0]["lr"]))
    yield trace
    handle.remove()


def cosine_with_warmup(t: int, updates_per_epoch: int) -> float:
    """timm's cosine schedule stepped per update, written out: linear warmup for one epoch from 1e-5, then
    0.5 * lr * (1 + cos(pi * t / T)) over the whole run (warmup included, as timm does without a prefix)."""
    warmup, total = updates_per_epoch, 2 * updates_per_epoch
    if t < warmup:
        return 1e-5 + t * (0.1 - 1e-5) / warmup
    return 0.5 * 0.1 * (1 + math.cos(math.pi * t / total))


def test_odd_micro_batches_stopped_mid_epoch_and_resumed_match_the_uninterrupted_run(tmp_path, lr_trace, capsys):
    train_set = build_datasets("digits", None, train_fraction=0.25, seed=0)[0]
    micro = len(train_set) // 17
    assert micro % 2 == 1                         # the case under test: the last accumulation is partial
    steps = math.ceil(micro / 2)
    expected = [cosine_with_warmup(t, steps) for t in range(2 * steps)]

    straight = tmp_path / "straight"
    run_train(straight, *RECIPE)
    assert f"{steps} steps/epoch" in capsys.readouterr().out
    assert json.loads((straight / "results.json").read_text())["steps"] == 2 * steps
    assert lr_trace == pytest.approx(expected, abs=1e-12)

    lr_trace.clear()
    split = tmp_path / "split"
    # steps - 1 is where rounding the step count down would end epoch 0: one partial accumulation is left
    run_train(split, *RECIPE, "--max-steps", str(steps - 1))
    assert latest_checkpoint(split).name == f"step_{steps - 1:08d}"
    assert not (split / "summary.csv").exists()  # the epoch did not end, so it was neither evaluated nor logged
    run_train(split, *RECIPE, "--max-steps", str(steps + 3), "--resume")     # stops inside epoch 1
    assert latest_checkpoint(split).name == f"step_{steps + 3:08d}"
    run_train(split, *RECIPE, "--resume")
    assert lr_trace == pytest.approx(expected, abs=1e-12)   # step for step, across both interruptions

    a, b = load_safetensors(straight / "model.safetensors"), load_safetensors(split / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
