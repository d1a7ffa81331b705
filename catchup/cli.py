"""How the scripts end: a one-line message and exit code 2 for a user error, never a traceback."""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Callable

from catchup.errors import CatchupError


def run_cli(main: Callable[[], object], interrupted: str = "interrupted") -> None:
    try:
        main()
    except CatchupError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except Exception as err:   # a CatchupError raised in a DataLoader worker arrives re-wrapped, with a traceback
        if "CatchupError" not in str(err):
            raise
        _fail(str(err).strip().splitlines()[-1].split("CatchupError: ")[-1])


def _fail(message: str) -> None:
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
