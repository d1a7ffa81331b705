"""A sweep's table: every finished run's results.json (and eval/report.json), then mean +- std over seeds.

Standard deviations are sample standard deviations (n - 1 in the denominator); with one seed there is none.
With a baseline (``--baseline mix=none``) each grid point also gets its last top-1 minus the baseline run's with
the same seed and other keys: where seeds change the data (a training subset), pairing takes out what two runs of
one seed share, so a difference can stand out that the spread over seeds would hide.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import uuid
from pathlib import Path
from typing import Any, Sequence

TIME_FILE = "sweep_time.json"   # wall and CPU seconds the sweep spent on a run, summed over its attempts
# results.json keys -> short column names
METRICS = {"best_top1": "best", "last_top1": "last", "median_last10_top1": "median10"}
_TITLES = {"best": "best top-1", "last": "last top-1", "median10": "median of last 10", "train_min": "train min",
           "cpu_min": "CPU min"}


def _eval_numbers(report_path: Path) -> dict[str, float]:
    """Flat columns from an evaluate.py report: ECE, NLL, FGSM error per eps, accuracy per deformation."""
    if not report_path.exists():
        return {}
    row = json.loads(report_path.read_text())["results"][0]
    out: dict[str, float] = {}
    if "clean" in row:
        out.update(ece=row["clean"]["ece"], nll=row["clean"]["nll"])
    for label, entry in row.get("fgsm", {}).items():
        out[f"fgsm_err_{label}"] = entry["error"]
    for name, value in row.get("deformation", {}).items():
        out[f"deform_{name}"] = value["mean"] if isinstance(value, dict) else value
    return out


def _train_minutes(run_dir: Path) -> float | None:
    """Training time without evaluation: the sum of summary.csv's per-epoch times."""
    path = run_dir / "summary.csv"
    if not path.exists():
        return None
    with path.open() as f:
        times = [float(r["epoch_time_s"]) for r in csv.DictReader(f) if r.get("epoch_time_s")]
    return sum(times) / 60 if times else None


def collect_runs(points: Sequence, group_keys: Sequence[str], seed_key: str) -> list[dict[str, Any]]:
    """One row per finished run (results.json present), in grid order."""
    rows = []
    for point in points:
        results_path = point.run_dir / "results.json"
        if not results_path.exists():
            continue
        results = json.loads(results_path.read_text())
        row: dict[str, Any] = {"run": point.name, **{k: point.values[k] for k in group_keys},
                               seed_key: point.values.get(seed_key, "")}
        row.update({short: results.get(key) for key, short in METRICS.items()})
        row["code"] = " ".join(results.get("provenance", {}).get("code", ["unknown"]))
        row["train_min"] = _train_minutes(point.run_dir)
        timing = point.run_dir / TIME_FILE
        row["cpu_min"] = json.loads(timing.read_text())["cpu_s"] / 60 if timing.exists() else None
        row.update(_eval_numbers(point.run_dir / "eval" / "report.json"))
        rows.append(row)
    return rows


def _number_columns(rows: list[dict[str, Any]], skip: set[str]) -> list[str]:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [c for c in columns if c not in skip]


def paired_differences(rows: list[dict[str, Any]], group_keys: Sequence[str], seed_key: str,
                       baseline: tuple[str, str], metric: str = "last") -> dict[tuple, list[float]]:
    """Per grid point (but the baseline's own): its ``metric`` minus the baseline run's of the same seed and the
    same other keys, one difference per seed both have."""
    key, value = baseline
    by_run = {(tuple(str(r[k]) for k in group_keys), str(r[seed_key])): r for r in rows}
    diffs: dict[tuple, list[float]] = {}
    for (group, seed), row in by_run.items():
        base_group = tuple(value if k == key else v for k, v in zip(group_keys, group))
        base = by_run.get((base_group, seed))
        if group != base_group and base is not None and all(
                isinstance(r.get(metric), (int, float)) for r in (row, base)):
            diffs.setdefault(group, []).append(row[metric] - base[metric])
    return diffs


def aggregate(rows: list[dict[str, Any]], group_keys: Sequence[str], seed_key: str,
              baseline: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows grouped by the non-seed grid keys (first-seen order): n, seeds, <col>_mean / <col>_std, and with a
    baseline ``paired_mean`` / ``paired_std`` / ``paired_wins`` (last top-1 minus the baseline's, per seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    columns = _number_columns(rows, {"run", "code", seed_key, *group_keys})
    paired = paired_differences(rows, group_keys, seed_key, baseline) if baseline else {}
    table = []
    for key, members in groups.items():
        out: dict[str, Any] = dict(zip(group_keys, key))
        out["n"] = len(members)
        out["seeds"] = " ".join(str(m[seed_key]) for m in members)
        for col in columns:
            values = [m[col] for m in members if isinstance(m.get(col), (int, float))]
            out[f"{col}_mean"] = statistics.fmean(values) if values else None
            out[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else None
        if baseline:
            diffs = paired.get(tuple(str(k) for k in key), [])
            out["paired_mean"] = statistics.fmean(diffs) if diffs else None
            out["paired_std"] = statistics.stdev(diffs) if len(diffs) > 1 else None
            out["paired_wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else ""
        table.append(out)
    return table


def code_versions(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each code version (commit, `+dirty`, or `unknown` for runs older than provenance) -> the runs made by it.
    A run resumed under other code counts under each of its versions."""
    versions: dict[str, list[str]] = {}
    for row in rows:
        for version in str(row.get("code", "unknown")).split():
            versions.setdefault(version, []).append(row["run"])
    return versions


def code_note(rows: list[dict[str, Any]]) -> str:
    """The table's line on which code made its runs; a warning when that is more than one version."""
    versions = code_versions(rows)
    if list(versions) == ["unknown"]:
        return f"None of the {len(rows)} runs records its code (they are older than run provenance)."
    if len(versions) == 1:
        return f"All {len(rows)} runs were made by code {next(iter(versions))}."
    listing = "; ".join(f"{v} ({len(runs)} run{'s' * (len(runs) > 1)}: {', '.join(runs[:4])}"
                        f"{', ...' if len(runs) > 4 else ''})" for v, runs in versions.items())
    return (f"WARNING: this table mixes runs of {len(versions)} code versions, so its differences may come from "
            f"the code rather than the grid: {listing}. Rerun the runs of the other versions (--overwrite "
            f"them, or a new --output) for a table of one code version.")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def _cell(mean: float | None, std: float | None, bold: bool) -> str:
    if mean is None:
        return ""
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return f"**{text}**" if bold else text


def markdown(table: list[dict[str, Any]], group_keys: Sequence[str], baseline: tuple[str, str] | None = None) -> str:
    """Mean ± std per grid point; the highest mean of each top-1 column in bold; with a baseline, the paired
    difference of last top-1 and how many seeds it was above 0."""
    if not table:
        return "(no finished runs yet)\n"
    standard = (*METRICS.values(), "train_min", "cpu_min")
    present = [c for c in standard if any(r.get(f"{c}_mean") is not None for r in table)]
    extra = [c[:-5] for c in table[0] if c.endswith("_mean") and c[:-5] not in (*standard, "paired")]
    columns = present + extra
    best = {c: max(r[f"{c}_mean"] for r in table if r.get(f"{c}_mean") is not None) for c in METRICS.values()
            if c in present}
    header = [*group_keys, "seeds", *(_TITLES.get(c, c) for c in columns)]
    if baseline:
        header.append(f"last − {baseline[1]}, same seed (above 0)")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in table:
        cells = [str(r[k]) for k in group_keys] + [str(r["n"])]
        cells += [_cell(r.get(f"{c}_mean"), r.get(f"{c}_std"), c in best and r.get(f"{c}_mean") == best[c])
                  for c in columns]
        if baseline:
            diff = r.get("paired_mean")
            cells.append("" if diff is None else f"{diff:+.2f}" + ("" if r["paired_std"] is None
                                                                  else f" ± {r['paired_std']:.2f}")
                         + f" ({r['paired_wins']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], group_keys: Sequence[str], path: Path) -> Path:
    """Grouped bars (best, median of last 10, last top-1) per grid point, with one-std error bars."""
    import numpy as np

    from catchup.robustness.plots import _new_figure, _save

    shown = [c for c in ("best", "median10", "last") if any(r.get(f"{c}_mean") is not None for r in table)]
    labels = [" ".join(str(r[k]) for k in group_keys) or "all" for r in table]
    fig = _new_figure(max(6.0, 0.75 * len(table) + 2), 4.5)
    ax = fig.add_subplot()
    centers = np.arange(len(table))
    width = 0.8 / max(len(shown), 1)
    low, high = math.inf, -math.inf
    for i, col in enumerate(shown):
        means = np.array([np.nan if r[f"{col}_mean"] is None else r[f"{col}_mean"] for r in table], dtype=float)
        stds = np.array([0.0 if r[f"{col}_std"] is None else r[f"{col}_std"] for r in table], dtype=float)
        ax.bar(centers + (i - (len(shown) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=_TITLES[col])
        if np.isfinite(means).any():
            low, high = min(low, np.nanmin(means - stds)), max(high, np.nanmax(means + stds))
    if math.isfinite(low):   # accuracies of similar methods: the interesting range, not 0-100
        margin = max(0.5, 0.15 * (high - low))
        ax.set_ylim(low - margin, high + margin)
    ax.set_xticks(centers, labels, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_paired(diffs: dict[tuple, list[float]], table: list[dict[str, Any]], group_keys: Sequence[str],
                baseline: tuple[str, str], path: Path) -> Path:
    """Each point's last top-1 minus the baseline's, seed by seed: one dot per seed, the mean as a bar with a
    one-std error bar, and the zero line."""
    import numpy as np

    from catchup.robustness.plots import _new_figure, _save

    shown = [r for r in table if tuple(str(r[k]) for k in group_keys) in diffs]
    fig = _new_figure(max(6.0, 0.6 * len(shown) + 2), 4.0)
    ax = fig.add_subplot()
    for i, r in enumerate(shown):
        values = diffs[tuple(str(r[k]) for k in group_keys)]
        ax.bar(i, r["paired_mean"], 0.6, yerr=r["paired_std"] or 0.0, capsize=3, color="tab:blue", alpha=0.6,
               error_kw={"ecolor": "gray"})
        ax.scatter(np.full(len(values), i), values, color="black", s=12, zorder=3)
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xticks(range(len(shown)), [" ".join(str(r[k]) for k in group_keys) for r in shown], rotation=30,
                  ha="right")
    ax.set_ylabel(f"last top-1 minus {baseline[1]}'s, same seed (points)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_tables(rows: list[dict[str, Any]], out_dir: Path, group_keys: Sequence[str],
                 seed_key: str = "seed", baseline: tuple[str, str] | None = None) -> list[Path]:
    """runs.csv (one row per run), table.csv / table.md (mean ± std per grid point) and table.png."""
    table = aggregate(rows, group_keys, seed_key, baseline)
    paths = [out_dir / "runs.csv", out_dir / "table.csv", out_dir / "table.md"]
    _write_csv(paths[0], rows)
    _write_csv(paths[1], table)
    note = f"\n{code_note(rows)}\n" if rows else ""
    paths[2].write_text(markdown(table, group_keys, baseline) + note)
    if any(r.get(f"{c}_mean") is not None for r in table for c in METRICS.values()):
        paths.append(plot(table, group_keys, out_dir / "table.png"))
    else:
        (out_dir / "table.png").unlink(missing_ok=True)   # no stale plot beside a table without numbers
    diffs = paired_differences(rows, group_keys, seed_key, baseline) if baseline else {}
    if diffs:
        paths.append(plot_paired(diffs, table, group_keys, baseline, out_dir / "table_paired.png"))
    else:
        (out_dir / "table_paired.png").unlink(missing_ok=True)
    return paths


def log_wandb_table(rows: list[dict[str, Any]], out_dir: Path, group_keys: Sequence[str], seed_key: str,
                    baseline: tuple[str, str] | None, *, name: str, mode: str, project: str,
                    entity: str | None) -> None:
    """The table (mean ± std per grid point) and its runs as W&B Tables, in a run of the sweep's W&B group; the
    run's id is kept in the sweep folder, so rebuilding the table adds a version to the same W&B run."""
    from catchup.wandb_mode import resolve_wandb_mode
    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb

    id_file = out_dir / "wandb_table_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else f"sweep-{uuid.uuid4().hex[:12]}"
    id_file.write_text(run_id + "\n")
    table = aggregate(rows, group_keys, seed_key, baseline)
    run = wandb.init(project=project, entity=entity, group=name, name=f"{name} (table)", job_type="sweep-table",
                     id=run_id, resume="allow", dir=str(out_dir), mode=mode,
                     config={"grid_keys": list(group_keys), "seed_key": seed_key, "code": code_note(rows)})
    try:
        run.log({"sweep/table": _wandb_table(table), "sweep/runs": _wandb_table(rows)})
    finally:
        run.finish()


def _wandb_table(rows: list[dict[str, Any]]):
    import wandb
    columns = list(dict.fromkeys(k for r in rows for k in r))
    # one type per column: numbers stay numbers, anything else (grid values, seeds, code) is text
    numeric = {c for c in columns if all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)}
    data = [[r.get(c) if c in numeric or r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    return wandb.Table(columns=columns, data=data)
