"""Checkpointer.save/load in-process on a tiny model: what a resume needs comes back from the checkpoint, not from
the process that loads it (random streams, the named parts)."""
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from catchup.engine import TrainProgress
from catchup.mix import build_mixer
from catchup.resume import Checkpointer
from tests.helpers import TinyNet


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def draws() -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


def test_load_restores_every_random_stream_and_the_named_parts(tmp_path, accelerator):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainProgress(epoch=1, step_in_epoch=2, global_step=13)
    mixer = build_mixer("catchup", model, num_classes=5, seed=0)
    mixer.seek(13)
    checkpointer = Checkpointer(accelerator, tmp_path, {"progress": progress, "mixer": mixer}, keep=2)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    folder = checkpointer.save()
    expected = draws()             # what the run would have drawn next, had it gone on

    # a new process: other seeds, its own progress and mixer
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    progress.load_state_dict(TrainProgress().state_dict())
    mixer.seek(0)
    checkpointer.load([folder], model, optimizer, scheduler=None)
    got = draws()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert (progress.epoch, progress.step_in_epoch, progress.global_step) == (1, 2, 13)
    assert mixer.calls == 13
