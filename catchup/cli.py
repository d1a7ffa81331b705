"""How the scripts end: a one-line message and exit code 2 for a user error, never a traceback."""
from __future__ import annotations

import sys
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
