"""How the scripts end: a one-line message and exit code 2 for a user error, never a traceback."""
from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from pathlib import Path
from typing import Callable, NoReturn

from catchup.errors import CatchupError
from catchup.stopping import STOPPED_EXIT_CODE, Stopped

_WORKER = "in DataLoader worker process"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals are CatchupErrors, so that `run_cli` prints them as the project's one
    `error:` line (argparse itself prints its usage and `prog: error: ...` on two)."""

    def error(self, message: str) -> NoReturn:
        raise CatchupError(f"{self.prog}: {message} (see --help)")


def user_path(text: str) -> Path:
    """argparse type of a path argument: `~` expanded also where the shell leaves it (`--output=~/x`, quoted),
    which would otherwise make a folder literally named `~`."""
    return Path(os.path.expanduser(text))


def run_cli(main: Callable[[], object], interrupted: str = "interrupted") -> None:
    try:
        main()
    except CatchupError as err:
        _fail(one_line(err) or str(err))
    except Stopped as stop:
        _close_progress_bars()
        print(stop, file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = one_line(err)
        if message is None:
            raise
        _fail(message)


def one_line(err: BaseException) -> str | None:
    """The user-facing line of an error that is not a bug: a CatchupError or a file-system error, also when a
    DataLoader worker raised it (the loader re-raises it with the worker's whole traceback in the message);
    None for anything else, which keeps its traceback."""
    text = str(err).strip()
    if _WORKER in text:
        last = text.splitlines()[-1]
        kind, _, detail = last.partition(": ")
        if kind.rsplit(".", 1)[-1] == "CatchupError":
            return detail
        if isinstance(err, OSError):
            return f"a DataLoader worker failed: {detail or kind}"
        return None
    if "CatchupError: " in text:         # re-wrapped by a library (e.g. a RuntimeError from a worker pool)
        return text.splitlines()[-1].split("CatchupError: ")[-1]
    if isinstance(err, OSError):         # a corrupt image, a full disk, a file that vanished
        return text.replace("\n", " ") or type(err).__name__
    if "No space left on device" in text:   # torch's zip writer and safetensors: a RuntimeError or their own type
        return f"a write failed: {text.splitlines()[-1]}"
    return None


def _fail(message: str) -> None:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def train() -> None:
    """The `catchup-train` command: train.py."""
    _run_script("train")


def evaluate() -> None:
    """The `catchup-evaluate` command: evaluate.py."""
    _run_script("evaluate")


def _run_script(name: str) -> None:
    """Run the repository's `<name>.py` as `__main__`: a wheel ships it as catchup.scripts.<name> (see
    pyproject.toml); a source checkout or an editable install has it beside the package."""
    module = f"catchup.scripts.{name}"
    try:
        shipped = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        shipped = False
    if shipped:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / f"{name}.py"), run_name="__main__")
def _close_progress_bars() -> None:
    """A bar an exception left open would put the message at the end of its line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
