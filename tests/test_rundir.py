"""The run folder's guards, in-process and cheap: the one-writer lock (held, refused naming pid and host, taken
over from a dead holder); checkpoint files checked on load (a missing or emptied RNG state); a resume asking for
fewer epochs than done; and the inputs the CLIs read from a run folder (data_info.json, filter-norm files)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catchup.config import dump_config, load_config
from catchup.errors import CatchupError
from catchup.rundir import LOCK, RunLock, check_output
from tests.helpers import run_train, snapshot

ROOT = Path(__file__).resolve().parents[1]
CKPT = "checkpoints/step_00000001"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "run"
    run_train(out, "--epochs", "1", "--max-steps", "1")      # one checkpoint, at step 1
    return out


def recipe(output: Path, *overrides: str):
    return load_config(ROOT / "configs/quickstart.yaml", ["--output", str(output), *overrides])


def test_a_held_lock_refuses_in_one_line_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from catchup.rundir import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        expected = f"{out} is being written by pid {holder.pid} on {socket.gethostname()}; wait for that run"
        for attempt in (lambda: check_output(recipe(out), False, False), lambda: RunLock(out).acquire()):
            with pytest.raises(CatchupError) as err:
                attempt()
            assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)      # dies without releasing: the kernel drops its lock
        holder.wait()
    assert (out / LOCK).read_text().split()[0] == str(holder.pid)       # its record is still there ...
    with RunLock(out).acquire():                                       # ... and taken over
        assert (out / LOCK).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    RunLock(out).acquire().release()             # released on leaving the block


def test_resume_with_fewer_epochs_than_begun_is_refused(tmp_path):
    out = tmp_path / "midway"
    checkpoint = out / "checkpoints/step_00000015"
    checkpoint.mkdir(parents=True)
    dump_config(recipe(out, "--epochs", "4"), out / "config.yaml")
    (out / "checkpoints/latest").write_text("step_00000015\n")
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 15, "epoch": 1, "step_in_epoch": 4, "processes": 1,
                                                            "parts": ["progress"], "files": {}}))
    with pytest.raises(CatchupError, match=r"epochs 1 is fewer than the run has already begun \(2, at step 15\)"):
        check_output(recipe(out, "--epochs", "1"), True, False)
    assert check_output(recipe(out, "--epochs", "2"), True, False) == {"epochs": (4, 2)}


def test_a_missing_or_emptied_rng_state_or_a_damaged_manifest_is_damage(run, tmp_path):
    from catchup.resume import verify_files
    missing, emptied, forged = (tmp_path / n for n in ("missing", "emptied", "forged"))
    for folder in (missing, emptied, forged):
        shutil.copytree(run, folder)
    (missing / CKPT / "random_states_0.pkl").unlink()
    assert verify_files(missing / CKPT)[1] == "step_00000001/random_states_0.pkl is missing"
    (missing / CKPT / "manifest.json").write_text('{"files": [1]}')
    assert verify_files(missing / CKPT)[1] == "step_00000001/manifest.json is damaged"
    (emptied / CKPT / "random_states_0.pkl").write_bytes(pickle.dumps({}))
    assert verify_files(emptied / CKPT)[1].startswith("step_00000001/random_states_0.pkl cannot be read (it has 5 "
                                                      "bytes")
    # an empty state with a manifest to match still is no RNG state: each part is checked by its content too
    import torch
    rng = forged / CKPT / "random_states_0.pkl"
    torch.save({}, rng)
    manifest = json.loads((forged / CKPT / "manifest.json").read_text())
    from catchup.resume import _sha256
    manifest["files"][rng.name] = {"size": rng.stat().st_size, "sha256": _sha256(rng)}
    (forged / CKPT / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CatchupError, match="random_states_0.pkl holds no random-number state"):
        run_train(forged, "--resume")


def test_overwrite_moves_the_old_run_aside_only_once_the_new_one_can_start(run, tmp_path):
    out = tmp_path / "kept"
    shutil.copytree(run, out)
    before = snapshot(out)
    with pytest.raises(CatchupError, match="cifar"):          # the new run's data is missing
        run_train(out, "--overwrite", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"))
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_a_batch_of_one_under_batchnorm_is_refused_before_the_run_folder_is_made(tmp_path):
    with pytest.raises(CatchupError, match="has BatchNorm, which needs at least 2"):
        run_train(tmp_path / "b1", "--batch-size", "1")
    assert not (tmp_path / "b1").exists()


def test_a_one_class_dataset_is_refused():
    from catchup.data import DataInfo
    from catchup.runs import build_model
    info = DataInfo(num_classes=1, in_chans=3, input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, family="digits")
    with pytest.raises(CatchupError, match="has 1 class: a classifier needs at least 2"):
        build_model(recipe(Path("unused")), info)


def test_a_damaged_data_info_is_one_line_in_export_and_analysis(run, tmp_path, capsys):
    from catchup.analysis.__main__ import main as analysis
    from catchup.cli import run_cli
    from catchup.export import main as export
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "data_info.json").write_text('{"num_classes": 10, "in_chans"')
    for command in (lambda: export([str(damaged), str(tmp_path / "exported")]),
                    lambda: sys.exit(analysis(["activations", "--run", str(damaged)]))):
        with pytest.raises(SystemExit) as end:
            run_cli(command)
        assert end.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {damaged / 'data_info.json'} is damaged"), err


def test_evaluation_on_a_dataset_with_other_classes_is_refused(run, tmp_path, monkeypatch):
    import catchup.evaluation
    other = tmp_path / "named"
    shutil.copytree(run, other)
    info = json.loads((run / "data_info.json").read_text())
    names = [f"n{i:02d}" for i in range(10)]
    (other / "data_info.json").write_text(json.dumps({**info, "classes": names}))
    # the run's dataset (digits) has no names; here it lists one class differently, as another folder would
    monkeypatch.setattr(catchup.evaluation, "class_names", lambda dataset: names[:3] + ["cat"] + names[4:])
    with pytest.raises(CatchupError, match="class 3 is 'cat' there, 'n03' in the run"):
        catchup.evaluation.open_run(other)
    (other / "data_info.json").write_text(json.dumps({**info, "num_classes": 7}))     # as if trained on 7
    with pytest.raises(CatchupError, match="has 10 classes, the run was trained on 7"):
        catchup.evaluation.open_run(other)


@pytest.mark.parametrize("grad, message", [(np.full((2, 3), np.nan), "NaN or infinite"),
                                           (np.ones((3, 3)), r"expected \[T\], \[T, C\], \[T, C\]"),
                                           (np.ones((2, 0)), r"expected \[T\]")])
def test_filter_norm_files_are_checked_before_plotting(tmp_path, grad, message):
    from catchup.analysis.filters import load_filter_norms
    path = tmp_path / "norms.npz"
    np.savez(path, stages=np.array(["s"]), **{"s/steps": np.arange(2), "s/act_norm": np.ones((2, grad.shape[1])),
                                              "s/grad_norm": grad})
    with pytest.raises(CatchupError, match=message):
        load_filter_norms(path)


def test_a_full_disk_writing_the_final_weights_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch,
                                                                                      capsys):
    from safetensors import SafetensorError
    from torch import nn

    import catchup.runs
    from catchup.cli import run_cli

    def full(state, filename, metadata=None):      # what safetensors raises on a full disk (not an OSError)
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(catchup.runs, "save_file", full)
    with pytest.raises(SystemExit) as end:
        run_cli(lambda: catchup.runs.save_weights(nn.Linear(2, 2), tmp_path / "model.safetensors"))
    assert end.value.code == 2 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.splitlines() == [
        f"error: no space left on the device of {tmp_path} while writing model.safetensors; the run's checkpoints are "
        f"kept: free some space and continue with --resume"]
    # any other writer that says so (a library's own error type) is one line too, never a traceback
    with pytest.raises(SystemExit) as end:
        run_cli(lambda: full({}, tmp_path / "other"))
    assert end.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: a write failed: Error while serializing: I/O error: No "
                                                    "space left on device (os error 28)"]
