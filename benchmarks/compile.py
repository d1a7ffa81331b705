"""Compiled against eager training steps, with and without Catch-up Mix: what torch.compile buys, and whether
mixing costs more once the model is compiled.

    python benchmarks/compile.py --quick                                  # resnet18, 32 px, CPU, inductor
    python benchmarks/compile.py --device cuda --amp bf16 --channels-last --model resnet50 --input-size 224

Each configuration (none / catchup x eager / compiled) trains its own copy of one initialisation on one synthetic
batch with the training loop's full step (overhead.py's ``make_step``); "compiled" is the training script's
``catchup.compile.compile_model`` (one graph, mixing through ``torch.cond``), the region rows its fallback
(``compile_regions``: the stage hooks stay eager between compiled regions). Warm-up steps compile, visiting
every mixing layer; the timed steps must compile nothing more (``graphs after warm-up``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):   # runnable as a script from any directory
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _timing import interleaved_times, load_average, median, step_peak_bytes  # noqa: E402  (before torch)
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import overhead  # noqa: E402
from catchup.cli import run_cli  # noqa: E402
from catchup.compile import compile_model, compile_regions, compile_whole  # noqa: E402
from catchup.errors import CatchupError  # noqa: E402
from catchup.mix import build_mixer  # noqa: E402

TARGET_COMPILED_RATIO = 1.03   # compiled Catch-up Mix step vs compiled no-mixing step
WHOLE_TRACED = "catchup compiled, whole model, hooks traced"
WHOLE_BREAKS = "catchup compiled, whole model, hooks as graph breaks"
MB = 2.0 ** 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="any timm model with feature_info")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: fast to compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (the first compiles)")
    p.add_argument("--memory", action="store_true", help="also measure each step's peak memory")
    p.add_argument("--whole-model", action="store_true",
                   help="also time Catch-up Mix with the whole model compiled: hooks traced (one graph per layer), "
                        "and hooks as graph breaks (slow to compile)")
    p.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 5, 2
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 1:
        raise CatchupError("--repeats and --warmup must be >= 1 (the first warm-up step compiles)")
    if args.batch_size < 2:
        raise CatchupError(f"--batch-size must be >= 2 (mixing pairs samples), got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CatchupError("--device cuda: no CUDA device is available")


def compile_traced_hooks(model: torch.nn.Module, backend: str, hooks_as_breaks: bool) -> None:
    """Earlier designs, measured against: ``torch.compile`` of the whole model's forward with the plain stage
    hooks traced into it (dynamo guards on the plan's layer: one graph per layer), or with each hook wrapped in
    ``torch.compiler.disable`` (a graph break at every hooked module, nested breaks resumed)."""
    if hooks_as_breaks:
        torch._dynamo.config.nested_graph_breaks = True
        for module in model.modules():
            for key, hook in list(module._forward_hooks.items()):
                module._forward_hooks[key] = torch.compiler.disable(hook)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compile_whole(model, backend)


def measure(args: argparse.Namespace, memory: bool = False) -> dict[str, Any]:
    """Step time (and peak memory) of none and catchup, eager and compiled; ratios against eager none."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = overhead.create_model(args, device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    steps, states, mixers, compile_s, graphs = {}, {}, {}, {}, {}
    # "compiled" is what --torchcompile does (compile_model: one graph, mixing through torch.cond); the region
    # rows are the fallback design, and "none compiled, catchup's regions" (Catch-up Mix's hooks and regions
    # with mixing off) separates the cost of cutting the model into regions from the cost of the mixing.
    configs = [("none", False, "none eager"), ("none", "model", "none compiled"), ("catchup", False, "catchup eager"),
               ("catchup", "model", "catchup compiled"), ("catchup", "regions", "catchup compiled, regions"),
               ("catchup", "regions", "none compiled, catchup's regions")]
    if getattr(args, "whole_model", False):   # gpu_check.py shares measure() without the flag
        configs += [("catchup", "traced", WHOLE_TRACED), ("catchup", "breaks", WHOLE_BREAKS)]
    for method, compiled, name in configs:
        model = copy.deepcopy(base)
        mixer = build_mixer(method, model, num_classes=args.num_classes, seed=args.seed,
                            input_size=(3, args.input_size, args.input_size))
        mixer.enabled = not name.startswith("none")
        if compiled in ("traced", "breaks"):
            compile_traced_hooks(model, args.backend, hooks_as_breaks=compiled == "breaks")
        elif compiled == "regions":
            compile_regions(model, args.backend)
        elif compiled:
            compile_model(model, args.backend, mixer)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        steps[name] = overhead.make_step(model, opt, mixer, x, y, args)
        states[name] = overhead.training_state(model, opt, x, y)
        mixers[name] = mixer
    gc.collect()
    for name, step in steps.items():   # the first step compiles; for Catch-up Mix, every layer is visited once
        start, before = time.perf_counter(), counters["stats"]["unique_graphs"]
        for _ in overhead.forced_layers(mixers[name]):
            step()
        compile_s[name] = time.perf_counter() - start
        graphs[name] = counters["stats"]["unique_graphs"] - before
    interleaved_times(steps, max(args.warmup - 1, 0), device)
    graphs_before = counters["stats"]["unique_graphs"]
    times = interleaved_times(steps, args.repeats, device)
    graphs_after = counters["stats"]["unique_graphs"]
    rows: dict[str, Any] = {}
    for name, t in times.items():
        rows[name] = {"step_s": median([w for w, _ in t]), "cpu_s": median([c for _, c in t]),
                      "first_steps_s": compile_s[name], "graphs": graphs[name]}
        if memory:
            peak = max(step_peak_bytes(steps[name], device) for _ in overhead.forced_layers(mixers[name]))
            rows[name]["peak_mem_mb"] = (peak + sum(s.untyped_storage().nbytes() for s in states[name]())) / MB
    for m in mixers.values():
        m.remove()
    ref = rows["none eager"]
    for name, row in rows.items():
        row["ratio_to_eager_none"] = row["step_s"] / ref["step_s"]
        row["cpu_ratio_to_eager_none"] = row["cpu_s"] / ref["cpu_s"]
        if memory:
            row["mem_ratio_to_eager_none"] = row["peak_mem_mb"] / ref["peak_mem_mb"]
    summary = {
        "catchup_vs_none_eager": rows["catchup eager"]["step_s"] / rows["none eager"]["step_s"],
        "catchup_vs_none_compiled": rows["catchup compiled"]["step_s"] / rows["none compiled"]["step_s"],
        "compiled_speedup_none": rows["none eager"]["step_s"] / rows["none compiled"]["step_s"],
        "compiled_speedup_catchup": rows["catchup eager"]["step_s"] / rows["catchup compiled"]["step_s"],
        "regions_cost": rows["none compiled, catchup's regions"]["step_s"] / rows["none compiled"]["step_s"],
        "catchup_regions_vs_none_compiled": (rows["catchup compiled, regions"]["step_s"]
                                             / rows["none compiled"]["step_s"]),
        **{f"{n} vs none compiled": rows[n]["step_s"] / rows["none compiled"]["step_s"]
           for n in (WHOLE_TRACED, WHOLE_BREAKS) if n in rows},
        "graphs_compiled_after_warmup": graphs_after - graphs_before,
        "target_catchup_vs_none_compiled": TARGET_COMPILED_RATIO}
    if memory:
        summary["catchup_vs_none_mem_eager"] = rows["catchup eager"]["peak_mem_mb"] / ref["peak_mem_mb"]
        summary["catchup_vs_none_mem_compiled"] = (rows["catchup compiled"]["peak_mem_mb"]
                                                   / rows["none compiled"]["peak_mem_mb"])
    return {"rows": rows, "summary": summary}


def report(result: dict[str, Any], meta: dict[str, Any]) -> str:
    rows, s = result["rows"], result["summary"]
    memory = "peak_mem_mb" in next(iter(rows.values()))
    head = ["configuration", "step ms", "ratio to eager none", "CPU ms", "CPU ratio", "first steps s (compile)",
            "graphs"] + (
        ["peak mem MB", "mem ratio"] if memory else [])
    body = [[n, f"{r['step_s'] * 1e3:.1f}", f"{r['ratio_to_eager_none']:.3f}", f"{r['cpu_s'] * 1e3:.1f}",
             f"{r['cpu_ratio_to_eager_none']:.3f}", f"{r['first_steps_s']:.1f}", str(r["graphs"])]
            + ([f"{r['peak_mem_mb']:.0f}", f"{r['mem_ratio_to_eager_none']:.3f}"] if memory else [])
            for n, r in rows.items()]
    verdict = "meets" if s["catchup_vs_none_compiled"] <= TARGET_COMPILED_RATIO else "MISSES"
    return "\n\n".join([
        f"{meta['model']}, batch {meta['batch']}, {meta['input']} px, {meta['device']}, amp {meta['amp']}, "
        f"channels_last {meta['channels_last']}, backend {meta['backend']}, {meta['repeats']} interleaved repeats; "
        f"load average before/after: {meta['load_before']} / {meta['load_after']}",
        overhead.table(head, body),
        f"catchup vs none: eager {s['catchup_vs_none_eager']:.3f}, compiled {s['catchup_vs_none_compiled']:.3f} "
        f"({verdict} <= {TARGET_COMPILED_RATIO}); compiled speed-up: none {s['compiled_speedup_none']:.2f}x, "
        f"catchup {s['compiled_speedup_catchup']:.2f}x; catchup's regions without mixing vs none compiled: "
        f"{s['regions_cost']:.3f}; catchup's regions vs none compiled: {s['catchup_regions_vs_none_compiled']:.3f}; "
        f"graphs compiled after warm-up: "
        f"{s['graphs_compiled_after_warmup']}"
        + "".join(f"; {k}: {v:.3f}" for k, v in s.items() if k.endswith("vs none compiled") and "catchup_" not in k)])


def meta_of(args: argparse.Namespace, load_before) -> dict[str, Any]:
    device = torch.device(args.device)
    return {"model": args.model, "batch": args.batch_size, "input": args.input_size, "amp": args.amp,
            "channels_last": args.channels_last, "backend": args.backend, "repeats": args.repeats,
            "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({overhead.cpu_name()})",
            "load_before": overhead._rounded(load_before), "load_after": overhead._rounded(load_average())}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    result = measure(args, memory=args.memory)
    result["_meta"] = meta_of(args, load_before)
    print(report(result, result["_meta"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
