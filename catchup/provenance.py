"""Which code, software and machine made a run: written into results.json and the W&B config, so that a table
built from run folders can tell when its runs came from different code.

Each start of a run (the first and every resume) appends its record to `provenance.jsonl` in the run folder;
results.json carries the last record and `code`, every distinct code version the run was trained with.
"""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ATTEMPTS = "provenance.jsonl"


def git_state(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the code runs from; (None, None) outside a checkout of this project (an
    installed package: its `catchup` version says which code). Untracked files (run folders, data) do not count
    as dirty: they are not code that was run."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # an installed package inside someone else's repository (a venv in their project) is not that project's code
    if top is None or Path(top.strip()).resolve() != repo.resolve():
        return None, None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def code_version(record: dict[str, Any]) -> str:
    """`<commit>` or `<commit>+dirty` (or `unknown`): what two runs must share to be runs of the same code."""
    commit = record.get("git_commit")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if record.get("git_dirty") else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect(device: Any, num_processes: int) -> dict[str, Any]:
    """This process's view of the run's start: code, versions, device and the command that started it."""
    import torch

    commit, dirty = git_state()
    on_gpu = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()
    return {
        "git_commit": commit, "git_dirty": dirty,
        "catchup": _version("catchup"),
        "python": platform.python_version(), "torch": torch.__version__, "timm": _version("timm"),
        "accelerate": _version("accelerate"),
        "device": str(device), "cpu": _cpu_model(), "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "num_processes": num_processes,
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }


def record_attempt(output: Path, record: dict[str, Any]) -> None:
    with (output / ATTEMPTS).open("a") as f:
        f.write(json.dumps(record) + "\n")


def attempts(output: Path) -> list[dict[str, Any]]:
    path = output / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def for_results(output: Path, record: dict[str, Any]) -> dict[str, Any]:
    """results.json's provenance: this attempt's record and every code version of the run's attempts."""
    versions = [code_version(r) for r in attempts(output)] or [code_version(record)]
    return {**record, "code": list(dict.fromkeys(versions))}
