"""Exported runs load with timm's `local-dir:` source; `wandb_log_model` logs the same files as a W&B artifact."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from timm.data import resolve_data_config

from catchup.cli import run_cli
from catchup.export import main as export_main
from catchup.runs import load_run
from tests.helpers import load_safetensors, run_train, wandb_records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One optimizer step of the quickstart with EMA weights and an offline W&B run logging the model."""
    out = tmp_path_factory.mktemp("export") / "run"
    run_train(out, "--max-steps", "1", "--model-ema", "--wandb-mode", "offline", "--wandb-log-model")
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ema", [False, True])
def test_export_loads_with_timm_local_dir(run, tmp_path, ema):
    out = export_main([str(run), str(tmp_path / "hf"), *(["--ema"] if ema else [])])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    weights = "model_ema.safetensors" if ema else "model.safetensors"
    assert _same_tensors(load_safetensors(out / "model.safetensors"), load_safetensors(run / weights))

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert _same_tensors(model.state_dict(), load_safetensors(run / weights))
    info = json.loads((run / "data_info.json").read_text())
    data = resolve_data_config(model=model)
    assert data["input_size"] == (1, 8, 8) and data["crop_pct"] == 1.0
    assert list(data["mean"]) == info["mean"] and list(data["std"]) == info["std"]
    reference = load_run(run, "ema" if ema else "final").model
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert json.loads((out / "config.json").read_text())["catchup"]["weights"] == ("ema" if ema else "final")


def test_export_refuses_a_folder_holding_other_files_and_pushing_offline_fails_in_one_line(
        run, tmp_path, capsys, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: export_main([str(run), str(busy)]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {busy} exists and holds other files; export into a new or empty folder"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: export_main([str(run), str(tmp_path / "hf"), "--push-to-hub", "someone/catchup-test"]))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot push to the Hugging Face Hub repo 'someone/catchup-test'")
    assert (tmp_path / "hf" / "model.safetensors").is_file()       # the local export is kept


def test_wandb_log_model_logs_the_final_weights_as_a_model_artifact(run):
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    artifacts = [r.artifact for r in wandb_records(files[0]) if r.HasField("artifact")]
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert [(a.name, a.type, list(a.aliases)) for a in artifacts] == [(f"model-{run_id}", "model", ["latest"])]
    entries = {e.path: Path(e.local_path) for e in artifacts[0].manifest.contents}
    assert set(entries) == {"config.json", "model.safetensors"}
    assert _same_tensors(load_safetensors(entries["model.safetensors"]), load_safetensors(run / "model.safetensors"))
    assert json.loads(entries["config.json"].read_text())["architecture"] == "preactresnet18"
