"""The evaluation report: report.json (every number), report.md (a paper-style table plus per-suite details),
PNG plots, and optionally the same numbers and plots in each run's W&B run."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from catchup.config import TrainConfig
from catchup.evaluation import EvalResult
from catchup.robustness import DEFORMATIONS
from catchup.robustness.corruptions import SEVERITIES

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any]]
_SHORT = {"rotate_20": "Rot ±20°", "rotate_40": "Rot ±40°", "shear_28.6": "Shear ±28.6°",
          "shear_57.2": "Shear ±57.2°", "zoom_60": "Zoom 60%", "zoom_80": "Zoom 80%", "zoom_120": "Zoom 120%",
          "zoom_140": "Zoom 140%"}
_LEGEND = ("FGSM Err: top-1 error under a one-step FGSM attack of that eps (pixel units). mCE: mean corruption error "
           "over the 15 standard corruptions x 5 severities (all: every corruption found). Deformations: top-1 "
           "accuracy. OOD: max-softmax detector, OOD positive. Acc @10% drop: top-1 accuracy after zeroing each "
           "sample's 10% largest pooled features; Feat. @50% mass: share of the features holding half of each "
           "sample's feature mass (both: higher = less reliance on few filters).")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _get(row: Row, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _mean_std(row: Row, suite: str, name: str) -> str | None:
    mean, std = _get(row, suite, name), _get(row, f"{suite}_std", name)
    if mean is None or std is None:
        return mean
    return f"{mean:.2f} ± {std:.2f}"


def _table(rows: Sequence[Row], columns: Sequence[Column]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(get(r)) for _, get in columns) + " |" for r in rows]
    return lines


def _id_columns() -> list[Column]:
    return [("Run", lambda r: r["label"]), ("Weights", lambda r: r["weights"])]


def _any(rows: Sequence[Row], suite: str) -> bool:
    return any(suite in r for r in rows)


def summary_columns(rows: Sequence[Row], eps_labels: Sequence[str]) -> list[Column]:
    """The paper-style table: one column per headline number of each suite that ran."""
    cols = _id_columns()
    if _any(rows, "clean"):
        cols.append(("Top-1 Err", lambda r: _get(r, "clean", "top1_err")))
    if _any(rows, "fgsm"):
        cols += [(f"FGSM Err {e}", lambda r, e=e: _get(r, "fgsm", e, "error")) for e in eps_labels]
    if _any(rows, "corruption"):
        cols += [("mCE", lambda r: _get(r, "corruption", "mce_15")),
                 ("mCE (all)", lambda r: _get(r, "corruption", "mce_all"))]
    if _any(rows, "deformation"):
        cols += [(_SHORT[n], lambda r, n=n: _get(r, "deformation", n)) for n in DEFORMATIONS]
    if _any(rows, "ood"):
        cols += [(h, lambda r, k=k: _get(r, "ood", k)) for h, k in (("FPR95", "fpr95"), ("AUROC", "auroc"),
                                                                   ("AUPR", "aupr"))]
    if _any(rows, "reliance"):
        cols += [("Acc @10% drop", lambda r: _get(r, "reliance", "acc_drop10")),
                 ("Feat. @50% mass", lambda r: _get(r, "reliance", "mass_share_50"))]
    return cols


def _corruption_lines(row: Row) -> list[str]:
    data = row["corruption"]
    cols: list[Column] = [("Corruption", lambda c: c["name"])]
    cols += [(f"s{s}", lambda c, s=s: _get(c, "errors", str(s))) for s in SEVERITIES]
    cols.append(("Mean", lambda c: c["mean"]))
    items = [{"name": n, "errors": data["errors"][n], "mean": data["per_corruption"][n]} for n in data["errors"]]
    items.append({"name": "**mean**", "errors": data["per_severity"], "mean": data["mce_all"]})
    head = f"**{row['label']} ({row['weights']})**: mCE {_fmt(data['mce_15'])} (15 standard corruptions), " \
           f"{_fmt(data['mce_all'])} (all {len(data['errors'])}); {data['n_per_slice']} images per slice"
    return [head, "", *_table(items, cols), ""]


def _reliance_lines(rows: Sequence[Row]) -> list[str]:
    rows = [r for r in rows if "reliance" in r]
    cols = _id_columns() + [("Features", lambda r: r["reliance"]["num_features"]),
                            ("Acc @10% drop", lambda r: r["reliance"]["acc_drop10"]),
                            ("Feat. @50% mass (%)", lambda r: r["reliance"]["mass_share_50"]),
                            ("Feat. @90% mass (%)", lambda r: r["reliance"]["mass_share_90"])]
    lines = _table(rows, cols) + ["", "Top-1 accuracy (%) after zeroing each sample's largest / smallest features:", ""]
    curve_cols: list[Column] = [("Dropped", lambda p: f"{100 * p[0]:.0f}%")]
    curve_cols += [(f"{r['label']} ({r['weights']})",
                    lambda p, r=r: f"{r['reliance']['largest_first'][p[1]]:.2f} / "
                                   f"{r['reliance']['smallest_first'][p[1]]:.2f}") for r in rows]
    points = [(f, i) for i, f in enumerate(rows[0]["reliance"]["fractions"])]
    return lines + _table(points, curve_cols)


def render_markdown(report: dict[str, Any], plots: dict[str, Path]) -> str:
    meta, rows = report["meta"], report["results"]
    eps = list(meta["fgsm_eps"])
    lines = ["# Evaluation report", "",
             f"Suites: {', '.join(meta['suites'])}. FGSM eps: {', '.join(eps) or '–'}. Seed {meta['seed']}, "
             f"{meta['num_processes']} process(es). All numbers in percent except NLL.", ""]
    lines += [f"- {suite} skipped: {note}" for suite, note in meta["skipped"].items()]
    lines += ["", "## Summary", "", *_table(rows, summary_columns(rows, eps)), "", _LEGEND, ""]
    if _any(rows, "clean"):
        cols = _id_columns() + [(h, lambda r, k=k: _get(r, "clean", k)) for h, k in (
            ("Top-1", "top1"), ("Top-5", "top5"), ("Top-1 Err", "top1_err"), ("Top-5 Err", "top5_err"),
            ("NLL", "nll"), ("ECE (15 bins)", "ece"), ("n", "n"))]
        lines += ["## Clean", "", *_table([r for r in rows if "clean" in r], cols), ""]
    if _any(rows, "fgsm"):
        cols = _id_columns() + [(f"eps {e} ({meta['fgsm_eps'][e]:.4f})", lambda r, e=e: _get(r, "fgsm", e, "error"))
                                for e in eps]
        lines += ["## FGSM top-1 error", "", *_table([r for r in rows if "fgsm" in r], cols), ""]
    if _any(rows, "corruption"):
        lines += ["## Corruption top-1 error", ""]
        for r in rows:
            if "corruption" in r:
                lines += _corruption_lines(r)
    if _any(rows, "deformation"):
        cols = _id_columns() + [(spec.label, lambda r, n=n: _mean_std(r, "deformation", n))
                                for n, spec in DEFORMATIONS.items()]
        lines += ["## Deformation top-1 accuracy", "",
                  f"Mean ± std over {meta.get('deform_draws', 1)} draws of the random rotations and shears "
                  f"(the zooms are fixed); centre: {meta.get('deform_centre', 'true')}.", "",
                  *_table([r for r in rows if "deformation" in r], cols), ""]
    if _any(rows, "ood"):
        items = [{"label": r["label"], "weights": r["weights"], "set": name, **m, "n_in": r["ood"]["n_in"]}
                 for r in rows if "ood" in r for name, m in r["ood"]["sets"].items()]
        cols = _id_columns() + [("OOD set", lambda i: i["set"]),
                                ("n in / out", lambda i: f"{i['n_in']} / {i['n_ood']}")]
        cols += [(h, lambda i, k=k: i[k]) for h, k in (("FPR95", "fpr95"), ("AUROC", "auroc"), ("AUPR", "aupr"))]
        lines += ["## OOD detection (max softmax, OOD positive)", "", *_table(items, cols), ""]
    if _any(rows, "reliance"):
        lines += ["## Filter reliance (pooled pre-logits features)", "", *_reliance_lines(rows), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{key}]({path.name})" for key, path in plots.items()] + [""]
    return "\n".join(lines)


def make_plots(results: Sequence[EvalResult], out_dir: Path) -> dict[str, Path]:
    """Reliance curves and deformation bars over all results; a reliability diagram and a corruption heat-map
    for each result."""
    from catchup.robustness import plot_corruption_heatmap, plot_deformations, plot_reliability, plot_reliance_curves

    plots: dict[str, Path] = {}
    named = [(f"{r.numbers['label']}/{r.numbers['weights']}", r) for r in results]
    curves = {}
    for name, r in named:
        if "reliance" in r.numbers:
            rel = r.numbers["reliance"]
            curves[f"{name} largest first"] = list(zip(rel["steps"], rel["largest_first"]))
            curves[f"{name} smallest first"] = list(zip(rel["steps"], rel["smallest_first"]))
    if curves:
        plots["reliance_curves"] = plot_reliance_curves(curves, out_dir / "reliance_curves.png")
    bars = {name: {DEFORMATIONS[k].label: v for k, v in r.numbers["deformation"].items()}
            for name, r in named if "deformation" in r.numbers}
    if bars:
        plots["deformations"] = plot_deformations(bars, out_dir / "deformations.png")
    for name, r in named:
        if r.confidence is not None:
            plots[f"reliability/{name}"] = plot_reliability(r.confidence, r.correct,
                                                            out_dir / f"reliability_{_slug(name)}.png")
        if r.corruption_errors:
            plots[f"corruption/{name}"] = plot_corruption_heatmap(r.corruption_errors,
                                                                  out_dir / f"corruption_{_slug(name)}.png")
    return plots


def write_report(results: Sequence[EvalResult], meta: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and the plots in `out_dir`; returns the plots by key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": [r.numbers for r in results]}
    plots = make_plots(results, out_dir)
    _write(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    _write(out_dir / "report.md", render_markdown(report, plots))
    return plots


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def flatten(prefix: str, value: Any) -> dict[str, float]:
    """Numeric leaves of nested dicts as `prefix/key/...` (slashes inside keys such as '4/255' become '_')."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}/{str(key).replace('/', '_')}", item))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: value}
    return {}


def log_to_wandb(results: Sequence[EvalResult], plots: dict[str, Path], configs: dict[str, TrainConfig],
                 out_dir: Path) -> None:
    """Log each run's numbers (`eval/<weights>/<suite>/...`) and plots into the run's own W&B run, resumed
    from `<run>/wandb_run_id.txt` where training stored it (else a new run). WANDB_MODE is honoured."""
    import wandb

    from catchup.recipe import resolve_wandb_mode

    mode = resolve_wandb_mode("auto")
    for run_dir, cfg in configs.items():
        own = [r for r in results if r.numbers["run"] == run_dir]
        values: dict[str, Any] = {}
        for r in own:
            suites = {k: v for k, v in r.numbers.items() if isinstance(v, dict)}
            values.update(flatten(f"eval/{r.numbers['weights']}", suites))
            for kind in ("reliability", "corruption"):
                path = plots.get(f"{kind}/{r.numbers['label']}/{r.numbers['weights']}")
                if path is not None:
                    values[f"eval/{r.numbers['weights']}/plots/{kind}"] = wandb.Image(str(path))
        values.update({f"eval/plots/{key}": wandb.Image(str(path)) for key, path in plots.items() if "/" not in key})
        id_file = Path(run_dir) / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id,
                         resume="allow" if run_id else None, name=None if run_id else Path(run_dir).name,
                         dir=str(out_dir), mode=mode, reinit="create_new")
        try:
            run.log(values)
        finally:
            run.finish()
