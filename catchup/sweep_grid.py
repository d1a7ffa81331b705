"""A sweep's grid: its keys and values, its points in run order, their run folders and train.py arguments."""
from __future__ import annotations

import argparse
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from catchup.config import config_to_dict
from catchup.errors import CatchupError

# recipe keys the sweep sets for every run, so a grid over them would be ignored or break the sweep
OWNED_KEYS = {"output": "each run's folder is set by the sweep (<output>/runs/<grid point>)",
              "experiment": "each run's folder is set by the sweep (<output>/runs/<grid point>)",
              "wandb_group": "every run of a sweep is in the W&B group of the sweep's --name"}


@dataclass
class Point:
    """One grid point: its overrides in grid order and its run folder."""
    values: dict[str, str]
    run_dir: Path
    wandb: bool = True      # whether its recipe logs to W&B (then it is given the sweep's W&B group)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.run_dir.name

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items())


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets or braces belong to the value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    if depth != 0 or any(not v.strip() for v in values):
        raise CatchupError(f"cannot read the grid values {text!r}: expected a comma-separated list like a,b,c")
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['mix=none,cutmix', 'seed=0,1'] -> {'mix': ['none', 'cutmix'], 'seed': ['0', '1']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise CatchupError(f"grid entries look like key=v1,v2,...; got {item!r}")
        if key in grid:
            raise CatchupError(f"grid key {key!r} is given twice")
        if key in OWNED_KEYS:
            raise CatchupError(f"grid key {key!r}: {OWNED_KEYS[key]}")
        values = split_values(text)
        if len(set(values)) != len(values):
            raise CatchupError(f"grid key {key!r} repeats a value: {text}")
        grid[key] = values
    return grid


def run_name(values: dict[str, str]) -> str:
    """Folder name of a grid point: `mix=none_seed=0`; characters a path should not hold become '-'. A recipe
    (the `config` key) is named by its file name without `.yaml`."""
    shown = {k: Path(v).stem if k == "config" else v for k, v in values.items()}
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.+=-]', '-', v)}" for k, v in shown.items())


def grid_points(grid: dict[str, list[str]], runs_dir: Path, seed_key: str = "seed") -> list[Point]:
    """Every combination, seed by seed (the seed key outermost), then in the grid's own order."""
    keys = list(grid)
    outer = [seed_key] if seed_key in grid else []
    inner = [k for k in keys if k not in outer]
    points = []
    for combo in itertools.product(*(grid[k] for k in outer + inner)):
        chosen = dict(zip(outer + inner, combo))
        values = {k: chosen[k] for k in keys}
        points.append(Point(values, runs_dir / run_name(values)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise CatchupError("two grid points map to the same run folder name; make the values differ in letters "
                           "or digits, not only in punctuation")
    return points


def point_overrides(point: Point) -> list[str]:
    return [arg for k, v in point.values.items() if k != "config" for arg in (f"--{k}", v)]


def point_recipe(args: argparse.Namespace, point: Point) -> Path:
    """The point's recipe: its `config` grid value (`--grid config=a.yaml,b.yaml`), else --config."""
    return Path(point.values["config"]) if "config" in point.values else args.config


def train_args(args: argparse.Namespace, fixed: list[str], point: Point) -> list[str]:
    """train.py's arguments for a grid point, the same for the local runner and a SLURM array task; runs that log
    to W&B are grouped under the sweep's name unless the overrides name a group."""
    named = any(a.split("=")[0] in ("--wandb-group", "--wandb_group") for a in fixed)
    group = ["--wandb-group", args.name] if point.wandb and not named else []
    return ["--config", str(point_recipe(args, point)), *point_overrides(point), *fixed, *group, "--output",
            str(point.run_dir)]


def refuse_equal_points(points: list[Point], configs: list, grid: dict[str, list[str]]) -> None:
    """Two grid points with the same recipe (`seed=0,00`, `lr=0.1,1e-1`) would be one run counted twice."""
    seen: dict[str, Point] = {}
    for point, cfg in zip(points, configs):
        recipe = {k: v for k, v in config_to_dict(cfg).items() if k != "output"}
        key = json.dumps(recipe, sort_keys=True, default=str)
        if key in seen:
            other = seen[key]
            k = next(k for k in grid if point.values[k] != other.values[k])
            raise CatchupError(f"grid key {k!r}: {other.values[k]!r} and {point.values[k]!r} are the same value, "
                               f"so two grid points would be the same run")
        seen[key] = point
