"""evaluate.py's command-line values: the suite names, the FGSM budgets, report labels. No torch here, so the
script checks its arguments before loading it."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

from catchup.errors import CatchupError

SUITES: tuple[str, ...] = ("clean", "fgsm", "corruption", "deformation", "ood", "reliance")


def parse_eps(text: str) -> tuple[tuple[str, float], ...]:
    """'4/255,8/255' or '0.03' -> ((label, value), ...), each value in [0, 1] pixel units."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise CatchupError(f"--fgsm-eps: cannot read {part!r} as a number or fraction like 4/255") from None
        if not 0.0 <= value <= 1.0:
            raise CatchupError(f"--fgsm-eps: {part} lies outside [0, 1] (pixel units, e.g. 4/255)")
        out.append((part, value))
    return tuple(out)


def select_suites(text: str, corruption_dir: Path | None, ood_dirs: Iterable[Path]) -> tuple[tuple[str, ...],
                                                                                            dict[str, str]]:
    """The suites to run and, for `all`, a note for each one skipped for lack of data."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES and n != "all"]
    if unknown or not names:
        raise CatchupError(f"unknown suite {unknown[0] if unknown else text!r}; choose from {', '.join(SUITES)} or all")
    needs = {"corruption": (corruption_dir is not None, "--corruption-dir"), "ood": (bool(list(ood_dirs)), "--ood-dir")}
    skipped: dict[str, str] = {}
    if "all" in names:
        # `all` runs what the given data allows; a suite also named explicitly must run
        skipped = {s: f"no {flag} given" for s, (given, flag) in needs.items() if not given and s not in names}
        names = [s for s in SUITES if s not in skipped]
    for suite, (given, flag) in needs.items():
        if suite in names and not given:
            raise CatchupError(f"--suite {suite} needs {flag}")
    return tuple(s for s in SUITES if s in names), skipped


def short_names(paths: Sequence[Path]) -> list[str]:
    """Folder names for tables, or the whole path where two folders share a name."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
