"""Loading a checkpoint back: every file is checked before Accelerate restores it, and a damaged latest checkpoint
falls back to the newest intact one. The lr schedule is rebuilt from the current recipe, so a resume that changes
``epochs`` follows the new schedule instead of the one restored from the checkpoint."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from catchup.errors import CatchupError
from catchup.rundir import START_OVER


def checkpoint_problem(folder: Path, accelerator: Accelerator, model: nn.Module, optimizer, custom_states: int
                       ) -> str | None:
    """None when every file of ``folder`` reads back and fits this model and optimizer, else what is wrong."""
    def name(path: Path) -> str:
        return f"{folder.name}/{path.name}"

    weights = folder / "model.safetensors"
    own = _plain_keys(model.state_dict())
    try:
        saved = _plain_keys(load_file(str(weights)))
    except Exception as err:  # safetensors raises its own error types for missing, truncated or corrupt files
        return f"{name(weights)} cannot be read ({_first_line(err)})"
    wrong = sorted(set(own) ^ set(saved)) or [k for k in own if saved[k].shape != own[k].shape]
    if wrong:
        return f"{name(weights)} does not fit the model ({_mismatch(wrong[0], own, saved)})"
    optimizer_file = folder / "optimizer.bin"
    try:
        state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        groups = state["param_groups"]
    except Exception as err:  # pickle, zip and key errors alike mean the same: the file is unusable
        return f"{name(optimizer_file)} cannot be read ({_first_line(err)})"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups] or not _state_fits(state["state"], params):
        return f"{name(optimizer_file)} does not fit the model's parameters"
    files = [folder / f"custom_checkpoint_{i}.pkl" for i in range(custom_states)]
    random_states = folder / f"random_states_{accelerator.process_index}.pkl"
    if random_states.exists():      # absent when fewer processes wrote the checkpoint; Accelerate then goes on
        files.append(random_states)
    found = [p for p in folder.iterdir() if re.fullmatch(r"custom_checkpoint_\d+\.pkl", p.name)]
    if len(found) != custom_states:
        return f"{folder.name} holds {len(found)} custom states, the run expects {custom_states}"
    for path in files:
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            return f"{name(path)} cannot be read ({_first_line(err)})"
    return None


def load_checkpoint(candidates: list[Path], accelerator: Accelerator, model: nn.Module, optimizer, scheduler,
                    custom_states: int, global_step: Callable[[], int], warn: Callable[[str], None] = print) -> Path:
    """Restore the first intact checkpoint of ``candidates`` (best first) and return it.

    The scheduler keeps the state it was built with (from the current recipe) and is set to the restored step;
    with an unchanged recipe that gives the lr the checkpoint holds.
    """
    problems = []
    for folder in candidates:
        problem = checkpoint_problem(folder, accelerator, model, optimizer, custom_states)
        if problem is not None:
            problems.append(problem)
            continue
        for skipped in problems:
            warn(f"warning: skipping a damaged checkpoint: {skipped}; resuming from {folder.name}")
        schedule = dict(scheduler.state_dict()) if scheduler is not None else None
        accelerator.load_state(str(folder))
        if scheduler is not None:
            scheduler.load_state_dict(schedule)
            scheduler.step_update(num_updates=global_step())
        return folder
    if len(candidates) == 1:
        raise CatchupError(f"cannot resume from {candidates[0]}: {problems[0]}")
    raise CatchupError(f"no intact checkpoint in {candidates[0].parent}: {'; '.join(problems)}; {START_OVER}")


def _plain_keys(state: dict) -> dict:
    """Keys without the wrappers' prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``), which differ with
    the number of processes and compilation while the weights are the same."""
    def plain(key: str) -> str:
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key
    return {plain(k): v for k, v in state.items()}


def _state_fits(state: dict, params: list[torch.Tensor]) -> bool:
    """Per-parameter optimizer buffers (momentum, Adam moments) have their parameter's shape."""
    for index, buffers in state.items():
        if not isinstance(index, int) or index >= len(params):
            return False
        shape = params[index].shape
        if any(torch.is_tensor(b) and b.dim() > 0 and b.shape != shape for b in buffers.values()):
            return False
    return True


def _mismatch(key: str, own: dict, saved: dict) -> str:
    if key not in saved:
        return f"{key} is missing"
    if key not in own:
        return f"unexpected {key}"
    return f"{key} has shape {tuple(saved[key].shape)}, the model {tuple(own[key].shape)}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
