"""Resume: a SIGTERM checkpoint and a damaged checkpoint both lead back to the weights of a run never stopped; the
epoch statistics of a resumed epoch cover all its steps; a resume that extends the run follows the new schedule.
The run folder: a second writer is refused while the first finishes as if alone; a bit flip falls back; a job
killed before its first checkpoint is requeued with --resume and completes; a full disk is refused up front, and a
checkpoint write that still meets one keeps the latest checkpoint."""
from __future__ import annotations

import csv
import math
import os
import shutil
import errno
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from catchup.config import load_config
from catchup.errors import CatchupError
from catchup.runs import latest_checkpoint
from catchup.stopping import STOPPED_EXIT_CODE, Stopped
from tests.helpers import TINY, load_safetensors, run_train, snapshot

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 11      # 449 digits (a quarter of the training split) in batches of 32, the last one dropped

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread) -> Path:
    """Two epochs, never stopped."""
    out = tmp_path_factory.mktemp("resume") / "straight"
    run_train(out)
    return out


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_safetensors(a / "model.safetensors"), load_safetensors(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def summary(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "summary.csv").open()))


def test_sigterm_checkpoints_and_a_resume_gives_the_uninterrupted_weights(straight, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # a checkpoint at every step shows how far the run got, and slows it enough to be caught mid-epoch
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--output", str(out),
                             *TINY, "--checkpoint-every-steps", "1"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step_00000003":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == STOPPED_EXIT_CODE, stderr
    assert "Traceback" not in stderr
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert 3 <= step < 2 * STEPS_PER_EPOCH
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {step}; the checkpoint is written, "
                                               "continue with --resume")
    assert not (out / "model.safetensors").exists()
    run_train(out, "--resume")          # checkpoint_every_steps may change on resume
    assert same_weights(out, straight)


def test_epoch_statistics_after_a_mid_epoch_stop_match_the_uninterrupted_run(straight, tmp_path, monkeypatch):
    from timm.scheduler.scheduler import Scheduler
    original = Scheduler.step_update

    def signal_at_step_5(self, num_updates, metric=None):
        original(self, num_updates, metric)
        if num_updates == 5:
            os.kill(os.getpid(), signal.SIGTERM)       # a real signal, at a known step

    out = tmp_path / "split"
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Scheduler, "step_update", signal_at_step_5)
    with pytest.raises(Stopped, match="SIGTERM at step 5"):
        run_train(out)
    monkeypatch.setattr(Scheduler, "step_update", original)
    assert latest_checkpoint(out).name == "step_00000005"
    assert signal.getsignal(signal.SIGTERM) is handler       # the run's handler is gone with the run
    run_train(out, "--resume")
    assert same_weights(out, straight)
    rows, expected = summary(out), summary(straight)
    assert [r.keys() for r in rows] == [r.keys() for r in expected]
    timing = ("images_per_s", "epoch_time_s")
    for row, want in zip(rows, expected):
        for key in set(want) - set(timing):      # the loss is summed in another order: equal up to rounding
            assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-6), key
        assert all(float(row[key]) > 0 for key in timing)
    shares = [float(v) for k, v in rows[0].items() if k.startswith("mix_layer_share/")]
    assert math.isclose(sum(shares), 1.0)                # every batch of the epoch counted once


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(straight, out)
    latest = latest_checkpoint(out)
    assert latest.name == "step_00000022"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (out / "model.safetensors").unlink()
    run_train(out, "--resume")          # epoch 1 again from step 11
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("warning: skipping a damaged checkpoint: step_00000022/model.safetensors cannot be "
                               "read") and line.endswith("resuming from step_00000011") for line in lines)
    assert same_weights(out, straight)
    assert latest_checkpoint(out).name == "step_00000022"


def test_resume_with_more_epochs_follows_the_longer_schedule_and_records_it(straight, tmp_path):
    out = tmp_path / "longer"
    shutil.copytree(straight, out)
    run_train(out, "--resume", "--epochs", "4", "--log-every", "5")
    rows = summary(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    # the quickstart cosine schedule (warmup of one epoch, lr 0.1, min_lr 0) over 4 epochs of 11 steps, after
    # step 33; the 2-epoch schedule restored from the checkpoint would give 0 here
    assert float(rows[2]["lr"]) == pytest.approx(0.05 * (1 + math.cos(math.pi * 33 / 44)))
    assert float(rows[3]["lr"]) == pytest.approx(0.0, abs=1e-12)
    cfg = load_config(out / "config.yaml")
    assert cfg.epochs == 4 and cfg.log_every == 5
    run_train(out, "--resume", "--epochs", "5", "--log-every", "5")
    history = [line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("# resumed")]
    assert len(history) == 2
    # the copy's output differs from the recorded one too, and is recorded
    assert history[0].startswith("# resumed at step 22: epochs 2 -> 4, ") and "log_every 2 -> 5" in history[0]
    assert history[1] == "# resumed at step 44: epochs 4 -> 5"


def test_the_stop_signals_are_sigterm_and_sigusr1_or_those_the_environment_names(monkeypatch):
    from catchup.stopping import ENV, StopOnSignal
    monkeypatch.delenv(ENV, raising=False)
    with StopOnSignal() as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)          # a repeat (as the launcher passes it on) changes nothing
        assert stop.requested(2) and stop.message(2).startswith("stopped by SIGUSR1 at step 2")
    term = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv(ENV, "usr2")
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) is term          # not one of the named signals
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested(3) and "SIGUSR2" in stop.message(3)
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_a_second_writer_is_refused_and_the_first_finishes_as_a_lone_run(straight, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--output", str(out),
                              *TINY], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock, deadline = out / ".writer.lock", time.monotonic() + 240
    while not (lock.exists() and lock.read_text().split()[:1] == [str(first.pid)]):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    holder = f"is being written by pid {first.pid} on {socket.gethostname()}"
    for second in (("--seed", "1"), ("--resume",), ("--overwrite",)):     # a mistake, a resume, a restart
        with pytest.raises(CatchupError, match=holder):
            run_train(out, *second)
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert same_weights(out, straight)


def test_a_bit_flip_in_the_weights_falls_back_to_the_previous_checkpoint(straight, tmp_path, capsys):
    out = tmp_path / "flipped"
    shutil.copytree(straight, out)
    weights = latest_checkpoint(out) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-40] ^= 0x10                   # inside the last tensor: the file still reads back
    weights.write_bytes(bytes(data))
    load_safetensors(weights)
    (out / "model.safetensors").unlink()
    run_train(out, "--resume")
    assert ("warning: skipping a damaged checkpoint: step_00000022/model.safetensors is damaged (its sha256 differs "
            "from the one in manifest.json); resuming from step_00000011") in capsys.readouterr().out
    assert same_weights(out, straight)


def test_a_job_killed_before_its_first_checkpoint_is_requeued_with_resume_and_completes(straight, tmp_path,
                                                                                      monkeypatch):
    from catchup.resume import Checkpointer

    def killed(self):
        raise KeyboardInterrupt         # the job dies at step 1, before its first checkpoint is written

    out = tmp_path / "requeued"
    monkeypatch.setattr(Checkpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(out, "--checkpoint-every-steps", "1")
    monkeypatch.undo()
    assert (out / "config.yaml").exists() and not list((out / "checkpoints").glob("step_*"))
    # the requeued job runs what the SLURM script launches on each node
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "1", "GPUS_PER_NODE": "1", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500"}
    env.pop("SLURM_SUBMIT_DIR", None)
    proc = subprocess.run(["bash", "slurm/train_multinode.sbatch", "configs/quickstart.yaml", *TINY, "--output",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip().split(":", 1)[1])
    assert argv[-1] == "--resume"
    run_train(out, *argv[argv.index("--output") + 2:])
    assert same_weights(out, straight)


def test_too_little_free_space_is_refused_before_anything_is_written(straight, tmp_path, monkeypatch):
    checkpoint = sum(f.stat().st_size for f in latest_checkpoint(straight).iterdir())
    # checkpoint_keep (2) + 1 checkpoints: one byte short when the estimate is no lower than the real size
    monkeypatch.setattr("catchup.rundir.free_bytes", lambda folder: 3 * checkpoint - 1)
    out = tmp_path / "full"
    with pytest.raises(CatchupError, match=r"not enough free space for .*full: 3 checkpoints of about"):
        run_train(out)
    assert not out.exists()
    # --overwrite moves the old run aside on the same disk: its two checkpoints are no room for the new ones
    shutil.copytree(straight, out)
    before = snapshot(out)
    monkeypatch.setattr("catchup.resume.Checkpointer.estimated_bytes", lambda self, model, optimizer: 1000)
    monkeypatch.setattr("catchup.rundir.free_bytes", lambda folder: 2500)
    with pytest.raises(CatchupError, match=r"not enough free space for .*full: 3 checkpoints of about 1000 bytes"):
        run_train(out, "--overwrite")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# what a full disk raises: the OS, safetensors (model.safetensors) its own error type, and torch's zip writer
# (optimizer.bin) a RuntimeError that reports only a short write
@pytest.mark.parametrize("full", [OSError(errno.ENOSPC, "No space left on device"),
                                  SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                                  "error 28)"),
                                  RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")],
                         ids=["ENOSPC", "safetensors", "zip-writer"])
def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_latest_checkpoint(straight, tmp_path,
                                                                                       monkeypatch, full):
    from accelerate import Accelerator
    original = Accelerator.save_state

    def disk_full(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)
        raise full

    out = tmp_path / "disk_full"
    shutil.copytree(straight, out)
    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(CatchupError, match="no space left on the device of .* while writing the checkpoint of step "
                                           "33; the latest checkpoint step_00000022 is kept"):
        run_train(out, "--resume", "--epochs", "3")
    assert latest_checkpoint(out).name == "step_00000022"
    assert not list((out / "checkpoints").glob(".incomplete-*"))


def test_an_evaluation_that_fails_keeps_the_epochs_training(straight, tmp_path, monkeypatch):
    import catchup.engine
    original = catchup.engine.evaluate

    def bad_image_in_epoch_1(model, loader, accelerator, channels_last=False):
        if latest_checkpoint(out).name == "step_00000022":
            raise CatchupError("cannot decode validation image 7.png")
        return original(model, loader, accelerator, channels_last)

    out = tmp_path / "eval_fails"
    monkeypatch.setattr(catchup.engine, "evaluate", bad_image_in_epoch_1)
    with pytest.raises(CatchupError, match="7.png"):
        run_train(out)
    monkeypatch.undo()
    assert latest_checkpoint(out).name == "step_00000022"      # written before the evaluation
    run_train(out, "--resume")                                   # evaluates epoch 1 without training it again
    assert same_weights(out, straight)
    assert [r.keys() for r in summary(out)] == [r.keys() for r in summary(straight)]
    assert summary(out)[1]["eval_top1"] == summary(straight)[1]["eval_top1"]
