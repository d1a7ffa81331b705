"""The GPU check: on one GPU, in a few minutes, with no downloads, what Catch-up Mix costs at ImageNet scale.

    python benchmarks/gpu_check.py                     # resnet50, 224 px, bf16, channels_last, on cuda
    python benchmarks/gpu_check.py --tiny              # the same sections at toy sizes on CPU, aot_eager backend

Sections (each reuses another benchmark's pieces):
  1. Catch-up Mix vs none, eager and compiled (one graph; regions, the fallback): step-time and peak-memory
     ratios (compile.py);
  2. Catch-up Mix forced to each layer: per-layer step-time and memory ratios (overhead.py);
  3. the training engine's step vs a bare PyTorch loop, images/s (throughput.py).
Writes <out>/gpu_check.json and <out>/gpu_check.md (the Markdown table for the README).
"""
from __future__ import annotations

import argparse
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

import compile as compile_bench  # noqa: E402  (benchmarks/compile.py, imports _timing before torch)
import overhead  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402
from _timing import load_average  # noqa: E402

from catchup.cli import run_cli  # noqa: E402

TINY = dict(model="test_resnet", input_size=32, batch_size=4, device="cpu", repeats=1, warmup=1, steps=2,
            throughput_repeats=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    compile_bench.add_arguments(p)
    p.set_defaults(model="resnet50", input_size=224, batch_size=128, amp="bf16", channels_last=True,
                   num_classes=1000, backend=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (the first compiles)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch (engine vs bare loop)")
    p.add_argument("--throughput-repeats", type=int, default=3, help="timed epochs per loop (engine vs bare loop)")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes on CPU (test_resnet, 32 px, batch 4, one repeat): checks that the script runs")
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json and .md")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.backend is None:    # inductor takes minutes to compile on a CPU; aot_eager checks the same path
        args.backend = "aot_eager" if args.tiny else "inductor"
    compile_bench.check(args)
    return args


def per_layer(args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--model", args.model, "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
            "--num-classes", str(args.num_classes), "--methods", "catchup", "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--device", args.device, "--amp", args.amp, "--seed", str(args.seed)]
    oargs = overhead.parse_args(argv + (["--channels-last"] if args.channels_last else []))
    device = torch.device(args.device)
    entries, _, _ = overhead.build_entries(oargs, device)
    overhead.measure(entries, oargs, device)
    summary = overhead.summarize(entries)
    for e in entries:
        e.mixer.remove()
    return summary


def engine_vs_bare(args: argparse.Namespace) -> dict[str, Any]:
    if args.amp != "none":   # throughput.py's Accelerator takes the precision a launcher would give it
        os.environ["ACCELERATE_MIXED_PRECISION"] = args.amp
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    argv = ["--model", args.model, "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
            "--num-classes", str(args.num_classes), "--steps", str(args.steps),
            "--repeats", str(args.throughput_repeats)]
    return throughput.main(argv + (["--channels-last"] if args.channels_last else []))


def markdown(result: dict[str, Any]) -> str:
    meta, s = result["_meta"], result["compile"]["summary"]
    eng = result["engine_vs_bare"]
    lines = [f"GPU check: {meta['model']}, {meta['input']} px, batch {meta['batch']}, {meta['amp']}, channels_last "
             f"{meta['channels_last']}, {meta['backend']}, on {meta['device']} (torch {meta['torch']}); "
             f"{meta['elapsed_s']:.0f} s in all", "",
             "| measure | eager | compiled |", "|---|---|---|",
             f"| Catch-up Mix / none, step time | {s['catchup_vs_none_eager']:.3f} | "
             f"{s['catchup_vs_none_compiled']:.3f} |",
             f"| Catch-up Mix / none, peak memory | {s['catchup_vs_none_mem_eager']:.3f} | "
             f"{s['catchup_vs_none_mem_compiled']:.3f} |",
             f"| compiled speed-up (none, catchup) | | {s['compiled_speedup_none']:.2f}x, "
             f"{s['compiled_speedup_catchup']:.2f}x |",
             f"| Catch-up Mix compiled as regions (the fallback) / none | | "
             f"{s['catchup_regions_vs_none_compiled']:.3f} |",
             f"| Catch-up Mix's regions, no mixing / none (cost of the regions) | | {s['regions_cost']:.3f} |",
             f"| graphs compiled after warm-up | | {s['graphs_compiled_after_warmup']} |",
             f"| training engine / bare PyTorch loop, images/s | {eng['ratio']:.3f} | |", "",
             "| Catch-up Mix at layer | step ratio to none | peak-memory ratio to none |", "|---|---|---|"]
    for name, row in result["per_layer"].items():
        if "@" in name:
            layer = row["layers"][0]
            lines.append(f"| {name.split('@')[1]} ({layer}) | {row['ratio']:.3f} | {row['peak_mem_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), load_average()
    result: dict[str, Any] = {}
    print("1/3 Catch-up Mix vs none, eager and compiled", flush=True)
    result["compile"] = compile_bench.measure(args, memory=True)
    print("2/3 Catch-up Mix at each layer", flush=True)
    result["per_layer"] = per_layer(args)
    print("3/3 training engine vs a bare PyTorch loop", flush=True)
    result["engine_vs_bare"] = engine_vs_bare(args)
    result["_meta"] = {**compile_bench.meta_of(args, load_before), "elapsed_s": time.perf_counter() - start}
    table = markdown(result)
    print(compile_bench.report(result["compile"], result["_meta"]), "", table, sep="\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table)
    return result


if __name__ == "__main__":
    run_cli(main)
