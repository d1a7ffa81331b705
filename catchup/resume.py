"""Checkpoints: written by one component (the engine calls ``Checkpointer.save``), read back by the same one.

A checkpoint is Accelerate's state (weights, optimizer, sampler, every process's RNG) plus the run's *named*
parts (``state_<name>.pkl``: progress, mixer, EMA, ...), and a ``manifest.json`` written last that lists every file
with its size and sha256, the part names, and where the run stood. Loading verifies the manifest first, then that
each file fits this run (weights the model, optimizer state its parameters, each part the keys of its object);
a damaged latest checkpoint falls back to the newest intact one. The lr schedule is not restored but rebuilt from
the current recipe and set to the restored step, so a resume that changes ``epochs`` follows the new schedule.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from catchup.errors import CatchupError
from catchup.rundir import (CHECKPOINTS, MANIFEST, START_OVER, checkpoint_dir, latest_checkpoint, read_manifest,
                            staging_dir)

FORMAT = 1
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def part_file(name: str) -> str:
    return f"state_{name}.pkl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class Checkpointer:
    """Saves and loads a run's checkpoints in ``output/checkpoints``.

    ``parts`` are the objects with ``state_dict``/``load_state_dict`` that Accelerate does not checkpoint itself,
    by name; ``progress`` (one of them) says which step a checkpoint holds. ``after_write`` runs on the main process
    once a checkpoint's files are written, before it is published (e.g. the filter-norm record).
    """

    def __init__(self, accelerator: Accelerator, output: Path, parts: dict[str, Any], keep: int,
                 after_write: Callable[[], None] | None = None):
        self.accelerator, self.output, self.parts, self.keep = accelerator, Path(output), parts, keep
        self.progress = parts["progress"]
        self.after_write = after_write
        self._chosen: tuple[list[Path], tuple[Path, list[str]]] | None = None

    # -- saving ---------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the checkpoint of the current step; a crash (or a full disk) at any moment leaves ``latest``
        naming a complete, verified checkpoint."""
        acc, step = self.accelerator, self.progress.global_step
        staging = staging_dir(self.output, step)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(staging))
            if acc.is_main_process:
                for name, obj in self.parts.items():
                    torch.save(obj.state_dict(), staging / part_file(name))
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.after_write is not None:
                    self.after_write()
                self._write_manifest(staging)
                self._publish(step)
        except Exception as err:    # OSError, torch's RuntimeError, safetensors' own SafetensorError
            if not _out_of_space(err):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            latest = latest_checkpoint(self.output)
            kept = f"the latest checkpoint {latest.name} is kept" if latest else "no checkpoint was written yet"
            raise CatchupError(f"no space left on the device of {self.output} while writing the checkpoint of step "
                               f"{step}; {kept}: free some space and continue with --resume") from None
        acc.wait_for_everyone()
        return checkpoint_dir(self.output, step)

    def _write_manifest(self, staging: Path) -> None:
        p = self.progress
        files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(staging.iterdir()) if f.is_file()}
        manifest = {"format": FORMAT, "step": p.global_step, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch,
                    "processes": self.accelerator.num_processes, "parts": list(self.parts), "files": files}
        tmp = staging / (MANIFEST + ".tmp")
        with tmp.open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staging / MANIFEST)

    def _publish(self, step: int) -> None:
        """Rename the written staging folder into place, point ``latest`` at it, drop the oldest ones."""
        final = checkpoint_dir(self.output, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging_dir(self.output, step), final)
        write_atomic(self.output / CHECKPOINTS / "latest", final.name + "\n")
        done = sorted(p for p in (self.output / CHECKPOINTS).glob("step_*") if p.is_dir())
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (self.output / CHECKPOINTS).glob(".incomplete-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def estimated_bytes(self, model: nn.Module, optimizer) -> int:
        """What one checkpoint will take: the weights, the optimizer's per-parameter buffers (allocated only at the
        first step, so counted from the optimizer's kind), and the parts (an EMA is a second copy of the weights)."""
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        params = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
        defaults = getattr(optimizer, "defaults", {})
        buffers = 2 if "betas" in defaults else 1 if defaults.get("momentum") else 0 if "momentum" in defaults else 2
        parts = sum(t.numel() * t.element_size() for obj in self.parts.values() if isinstance(obj, nn.Module)
                    for t in obj.state_dict().values())
        return weights + buffers * params + parts + (1 << 20)     # + pickles, RNG states, manifest

    # -- loading --------------------------------------------------------------------------------------------------
    def problem(self, folder: Path, model: nn.Module, optimizer) -> str | None:
        """None when ``folder`` is intact and fits this run, else what is wrong (one phrase)."""
        manifest, problem = verify_files(folder)
        if problem:
            return problem
        if manifest["parts"] != list(self.parts):
            return (f"{folder.name} holds the parts {', '.join(manifest['parts'])}, the run has "
                    f"{', '.join(self.parts)}")
        return (_weights_problem(folder, model) or _optimizer_problem(folder, optimizer)
                or self._parts_problem(folder, manifest))

    def _parts_problem(self, folder: Path, manifest: dict) -> str | None:
        for name, obj in self.parts.items():
            path = folder / part_file(name)
            state = _read_pickle(path)
            if isinstance(state, str):
                return state
            if not isinstance(state, dict) or set(state) != set(obj.state_dict()):
                return f"{folder.name}/{path.name} does not hold the {name} state this run has"
        index = self.accelerator.process_index
        if index < manifest["processes"]:     # a resume on more processes than wrote it: the extra ones start fresh
            path = folder / f"random_states_{index}.pkl"
            state = _read_pickle(path)
            if isinstance(state, str):
                return state
            if not isinstance(state, dict) or any(k not in state for k in RNG_KEYS):
                return f"{folder.name}/{path.name} holds no random-number state"
        return None

    def choose(self, candidates: list[Path], model: nn.Module, optimizer) -> tuple[Path, list[str]]:
        """The first intact checkpoint of ``candidates`` (best first), and what is wrong with those before it.

        The answer is kept for the same candidates: train.py asks before it claims the run folder (to refuse without
        writing) and again to load, and reading every file twice would double a large checkpoint's load time."""
        if self._chosen is not None and self._chosen[0] == candidates:
            return self._chosen[1]
        problems = []
        for folder in candidates:
            problem = self.problem(folder, model, optimizer)
            if problem is None:
                self._chosen = (list(candidates), (folder, problems))
                return folder, problems
            problems.append(problem)
        if len(candidates) == 1:
            raise CatchupError(f"cannot resume from {candidates[0]}: {problems[0]}")
        raise CatchupError(f"no intact checkpoint in {candidates[0].parent}: {'; '.join(problems)}; {START_OVER}")

    def load(self, candidates: list[Path], model: nn.Module, optimizer, scheduler,
             warn: Callable[[str], None] = print) -> Path:
        """Restore the first intact checkpoint of ``candidates`` and return it."""
        folder, problems = self.choose(candidates, model, optimizer)
        for skipped in problems:
            warn(f"warning: skipping a damaged checkpoint: {skipped}; resuming from {folder.name}")
        self.accelerator.load_state(str(folder))
        for name, obj in self.parts.items():
            obj.load_state_dict(torch.load(folder / part_file(name), map_location="cpu", weights_only=False))
        if scheduler is not None:
            scheduler.step_update(num_updates=self.progress.global_step)
        return folder


def verify_files(folder: Path) -> tuple[dict, str | None]:
    """The manifest of ``folder`` and None when every file it lists is there with its size and checksum."""
    if not (folder / MANIFEST).is_file():
        return {}, f"{folder.name} has no {MANIFEST} (not completely written, or by a catchup without checksums)"
    manifest = read_manifest(folder)
    files = manifest["files"] if manifest else None
    if not files or any(not isinstance(w, dict) or not isinstance(w.get("size"), int)
                        or not isinstance(w.get("sha256"), str) for w in files.values()):
        return {}, f"{folder.name}/{MANIFEST} is damaged"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return manifest, f"{folder.name}/{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return manifest, f"{folder.name}/{name} cannot be read (it has {size} bytes, {want['size']} were written)"
        if _sha256(path) != want["sha256"]:
            return manifest, f"{folder.name}/{name} is damaged (its sha256 differs from the one in {MANIFEST})"
    return manifest, None


def _weights_problem(folder: Path, model: nn.Module) -> str | None:
    weights = folder / "model.safetensors"
    own = _plain_keys(model.state_dict())
    try:
        saved = _plain_keys(load_file(str(weights)))
    except Exception as err:  # safetensors raises its own error types for missing, truncated or corrupt files
        return f"{folder.name}/{weights.name} cannot be read ({_first_line(err)})"
    wrong = sorted(set(own) ^ set(saved)) or [k for k in own if saved[k].shape != own[k].shape]
    if wrong:
        return f"{folder.name}/{weights.name} does not fit the model ({_mismatch(wrong[0], own, saved)})"
    return None


def _optimizer_problem(folder: Path, optimizer) -> str | None:
    path = folder / "optimizer.bin"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        groups = state["param_groups"]
    except Exception as err:  # pickle, zip and key errors alike mean the same: the file is unusable
        return f"{folder.name}/{path.name} cannot be read ({_first_line(err)})"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups] or not _state_fits(state["state"], params):
        return f"{folder.name}/{path.name} does not fit the model's parameters"
    return None


def _read_pickle(path: Path) -> Any:
    """The unpickled content, or (as a str) why it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        return f"{path.parent.name}/{path.name} cannot be read ({_first_line(err)})"


def _out_of_space(err: BaseException) -> bool:
    # torch's zip writer and safetensors report a full disk as RuntimeError text, not as OSError(ENOSPC); the zip
    # writer (optimizer.bin, the parts) only says its write came up short: "inline_container.cc ... unexpected pos"
    text = str(err)
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or \
        "file write failed" in text or ("inline_container" in text and "unexpected pos" in text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
