"""Training-step time and peak memory of every mixing method against no mixing, in one process.

    python benchmarks/overhead.py --model resnet18 --batch-size 64 --input-size 32 --repeats 30 --json out.json

Every method trains its own copy of one initialisation on the same synthetic batch; repetitions run
round-robin over the methods so machine noise hits them alike. Catch-up Mix is also measured at each layer
alone (its cost depends on the stage it mixes), and ``catchup_mix`` itself is timed against the stage forward
that produces its input.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):   # runnable as a script from any directory
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _timing import Step, interleaved_times, load_average, median, step_peak_bytes  # noqa: E402  (before torch)
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from torch import nn  # noqa: E402

import catchup.models  # noqa: E402,F401  (registers the CIFAR models with timm)
from catchup.cli import run_cli  # noqa: E402
from catchup.errors import CatchupError  # noqa: E402
from catchup.mix import MIXERS, Mixer, build_mixer  # noqa: E402
from catchup.mix.catchup import apply_keep_mask, catchup_keep_mask, filter_influence  # noqa: E402
from catchup.stages import feature_stages  # noqa: E402

TARGET_STEP_RATIO, TARGET_MEM_RATIO = 1.02, 1.05   # Catch-up Mix vs no mixing (resnet18, 32 px, CPU)
QUICK = dict(repeats=3, warmup=1, op_repeats=10)
FULL = dict(repeats=30, warmup=3, op_repeats=50)
MB = 2.0 ** 20


@dataclass
class Entry:
    """One configuration to measure: a method (or Catch-up Mix forced to one layer) with its own model."""
    name: str
    mixer: Mixer
    step: Step
    state: Callable[[], list[torch.Tensor]]   # what lives between steps: weights, optimizer state, the batch
    times: list[tuple[float, float]] = field(default_factory=list)   # (wall, CPU) seconds per step
    step_peak_bytes: int = 0      # the peak allocated during a step above what was live before it
    state_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """What ``max_memory_allocated`` would show over a step if this were the only model on the device
        (the benchmark holds one model per method, so the device-wide counter cannot be used as is)."""
        return self.step_peak_bytes + self.state_bytes

    @property
    def layers(self) -> list[str]:
        return [s.module_name or "input" for s in self.mixer.stages]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help="any timm model with feature_info")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--methods", default="all", help="comma-separated names from the registry, or 'all'")
    p.add_argument("--repeats", type=int, default=None, help=f"timed steps per method (default {FULL['repeats']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps per method (default {FULL['warmup']})")
    p.add_argument("--op-repeats", type=int, default=None, help="timed calls per operation in the feature-op table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few repeats: a smoke run of about a minute on 2 cores")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0 or args.op_repeats < 1:
        raise CatchupError("--repeats and --op-repeats must be >= 1 and --warmup >= 0")
    if args.batch_size < 2:
        raise CatchupError(f"--batch-size must be >= 2 (mixing pairs samples), got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CatchupError("--device cuda: no CUDA device is available")
    args.methods = list(MIXERS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in MIXERS]
    if unknown or not args.methods:
        raise CatchupError(f"--methods: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(MIXERS)})")
    if "none" not in args.methods:
        args.methods.insert(0, "none")   # every ratio is relative to it
    return args


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def make_step(model: nn.Module, opt: torch.optim.Optimizer, mixer: Mixer, x: torch.Tensor, y: torch.Tensor,
              args: argparse.Namespace) -> Step:
    """One training step exactly as the training loop runs it (mixer, forward, soft-target loss, update)."""
    criterion = SoftTargetCrossEntropy()
    dtype = amp_dtype(args.amp)
    # init_scale 1: the default 2**16 overflows in the first steps, which then skip the update (and create
    # the momentum later, inside a measured step); the scaler's own work is still timed.
    scaler = torch.amp.GradScaler(args.device, init_scale=1.0) if dtype == torch.float16 else None

    def step() -> None:
        xm, soft = mixer(x, y)
        with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(xm)
            loss = criterion(out, soft)
            aux = mixer.auxiliary_loss(out)
            if aux is not None:
                loss = loss + aux
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def create_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device).train()
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def build_entries(args: argparse.Namespace, device: torch.device) -> tuple[list[Entry], nn.Module, torch.Tensor]:
    """Every method, then Catch-up Mix at each single layer; each on its own copy of one initialisation."""
    torch.manual_seed(args.seed)
    base = create_model(args, device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    configs: list[tuple[str, str, dict[str, Any]]] = [(m, m, {}) for m in args.methods]
    if "catchup" in args.methods:
        configs += [(f"catchup@{k}", "catchup", {"layers": [k]}) for k in range(len(feature_stages(base)))]
    entries = []
    for name, method, options in configs:
        model = copy.deepcopy(base)   # the same weights as a load_state_dict, without timm's slow init
        mixer = build_mixer(method, model, num_classes=args.num_classes, seed=args.seed,
                            input_size=(3, args.input_size, args.input_size), **options)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        entries.append(Entry(name, mixer, make_step(model, opt, mixer, x, y, args), training_state(model, opt, x, y)))
    return entries, base, x


def measure(entries: list[Entry], args: argparse.Namespace, device: torch.device) -> None:
    """Warm-up, interleaved timing, then (separately, the profiler being slow) one memory pass per layer."""
    steps = {e.name: e.step for e in entries}
    gc.collect()   # once: collecting before every timed batch costs seconds with timm's many objects
    if args.warmup:
        interleaved_times(steps, args.warmup, device)
    for name, times in interleaved_times(steps, args.repeats, device).items():
        next(e for e in entries if e.name == name).times = times
    for e in entries:
        e.step_peak_bytes = max(step_peak_bytes(e.step, device) for _ in forced_layers(e.mixer))
        e.state_bytes = sum(t.untyped_storage().nbytes() for t in e.state())   # after a step: momentum exists


def training_state(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """A callable listing the tensors alive between steps, each storage once (grads are set to None)."""
    def tensors() -> list[torch.Tensor]:
        found = [*model.parameters(), *model.buffers(), x, y,
                 *(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))]
        return list({t.untyped_storage().data_ptr(): t for t in found}.values())
    return tensors


def forced_layers(mixer: Mixer):
    """Yields once per layer the mixer samples, with the plan forced to that layer (memory depends on the
    layer, so the reported peak is the worst layer's, not whichever the random draws happened to visit)."""
    weights = mixer.layer_weights
    n = len(mixer.stages)
    if n <= 1:
        yield None
        return
    try:
        for k in range(n):
            mixer.layer_weights = np.eye(n)[k]
            yield k
    finally:
        mixer.layer_weights = weights


def summarize(entries: list[Entry]) -> dict[str, dict[str, Any]]:
    ref = next(e for e in entries if e.name == "none")
    ref_s, ref_cpu = (median([t[i] for t in ref.times]) for i in (0, 1))
    out = {}
    for e in entries:
        wall, cpu = [t[0] for t in e.times], [t[1] for t in e.times]
        step_s, cpu_s = median(wall), median(cpu)
        q1, q3 = np.percentile(wall, [25, 75])
        out[e.name] = {"step_s": step_s, "ratio": step_s / ref_s, "step_iqr_s": float(q3 - q1),
                       "cpu_s": cpu_s, "cpu_ratio": cpu_s / ref_cpu if ref_cpu > 0 else float("nan"),
                       "peak_mem_mb": e.peak_bytes / MB, "peak_mem_ratio": e.peak_bytes / ref.peak_bytes,
                       "step_peak_mem_mb": e.step_peak_bytes / MB,
                       "step_peak_mem_ratio": e.step_peak_bytes / max(ref.step_peak_bytes, 1),
                       "layers": e.layers}
    return out


def feature_op_table(base: nn.Module, x: torch.Tensor, none_row: dict[str, Any], args: argparse.Namespace,
                     device: torch.device) -> list[dict[str, Any]]:
    """``catchup_mix`` alone, in parts, against the forward of the stage whose output it mixes.

    Times the training path (kept-channel count as a 0-dim tensor, h requiring grad) at lam = 0.5;
    ``fwd_bwd_step_pct`` is the forward plus backward of the mixing as a share of a full unmixed step.
    On CPU the clock is the process's CPU time: sub-millisecond wall times on a shared machine mostly
    measure the other jobs.
    """
    clock = 1 if device.type == "cpu" else 0
    step_s = none_row["cpu_s" if clock else "step_s"]
    stages = feature_stages(base)[1:]
    modules = dict(base.named_modules())
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(module, inputs, output) -> None:   # returns None: the forward goes on unchanged
            captured.setdefault(name, (inputs[0].detach().clone(), output.detach().clone()))
        return hook

    hooks = [modules[s.module_name].register_forward_hook(capture(s.module_name)) for s in stages]
    dtype = amp_dtype(args.amp)
    autocast = torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        base(x)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(args.batch_size, generator=g).to(device)
    rows = []
    for s in stages:
        inp, out = captured[s.module_name]
        module = modules[s.module_name]
        h = out.requires_grad_()
        grad = torch.randn(h.shape, generator=g).to(device, h.dtype).contiguous(memory_format=_format(h))
        n_keep = torch.tensor(h.shape[1] // 2)
        keep = catchup_keep_mask(h, index, n_keep)

        def stage_fwd(module=module, inp=inp):
            with autocast:
                module(inp)   # stage modules may ReLU their input in place: idempotent, so reusing it is fair

        ops = {"stage fwd": stage_fwd,
               "filter_influence": lambda h=h: filter_influence(h),
               "keep mask": lambda h=h, k=n_keep: catchup_keep_mask(h, index, k),
               "apply mask": lambda h=h, keep=keep: apply_keep_mask(h, index, keep),
               "catchup fwd": lambda h=h, k=n_keep: apply_keep_mask(h, index, catchup_keep_mask(h, index, k)),
               # autograd.grad, not backward: accumulating into h.grad would add work a real step does not do
               "catchup fwd+bwd": lambda h=h, k=n_keep, grad=grad: torch.autograd.grad(
                   apply_keep_mask(h, index, catchup_keep_mask(h, index, k)), h, grad)}
        for fn in ops.values():
            fn()
        timed = interleaved_times(ops, args.op_repeats, device)
        ms = {k: median([t[clock] for t in v]) * 1e3 for k, v in timed.items()}
        rows.append({"stage": s.module_name, "shape": list(h.shape), **{k.replace(" ", "_") + "_ms": v
                     for k, v in ms.items()},
                     "fwd_vs_stage_fwd": ms["catchup fwd"] / ms["stage fwd"],
                     "fwd_bwd_step_pct": 100 * ms["catchup fwd+bwd"] / (step_s * 1e3)})
    return rows


def _format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def method_rows(results: dict[str, dict[str, Any]], names: list[str]) -> list[list[str]]:
    return [[n, f"{r['step_s'] * 1e3:.1f}", f"{r['step_iqr_s'] * 1e3:.1f}", f"{r['ratio']:.3f}",
             f"{r['cpu_s'] * 1e3:.1f}", f"{r['cpu_ratio']:.3f}",
             f"{r['peak_mem_mb']:.1f}", f"{r['peak_mem_ratio']:.3f}", f"{r['step_peak_mem_mb']:.1f}",
             f"{r['step_peak_mem_ratio']:.3f}", ",".join(r["layers"]) or "-"]
            for n, r in results.items() if n in names]


def report(results: dict[str, Any]) -> str:
    meta = results["_meta"]
    head = ["method", "step ms (median)", "IQR ms", "ratio to none", "cpu ms", "cpu ratio", "peak mem MB",
            "mem ratio", "step-only MB", "step-only ratio", "layers sampled"]
    parts = [f"{meta['model']}, batch {meta['batch']}, {meta['input']} px, {meta['device']} "
             f"({meta['threads']} threads), amp {meta['amp']}, channels_last {meta['channels_last']}, "
             f"{meta['repeats']} interleaved repeats; load average before/after: {meta['load_before']} / "
             f"{meta['load_after']}",
             f"peak mem = training state ({meta['state_mb']:.1f} MB: weights, buffers, momentum, batch) + the peak "
             "allocated during one step above it (step-only); the worst layer for methods that sample layers",
             *oversubscribed(meta),
             table(head, method_rows(results, [n for n in results if not n.startswith("_")]))]
    per_layer = results.get("_catchup_per_layer", {})
    if per_layer:
        parts += ["Catch-up Mix forced to one layer:", table(head, method_rows(per_layer, list(per_layer)))]
    ops = results.get("_feature_op", [])
    if ops:
        op_head = ["stage", "shape", "stage fwd", "filter_influence", "keep mask", "apply mask", "catchup fwd",
                   "catchup fwd+bwd", "fwd / stage fwd", "fwd+bwd % of step"]
        op_rows = [[r["stage"], "x".join(map(str, r["shape"])), *(f"{r[k]:.3f}" for k in (
            "stage_fwd_ms", "filter_influence_ms", "keep_mask_ms", "apply_mask_ms", "catchup_fwd_ms",
            "catchup_fwd+bwd_ms")), f"{r['fwd_vs_stage_fwd']:.2f}", f"{r['fwd_bwd_step_pct']:.2f}"] for r in ops]
        clock = "CPU time" if meta["device"].startswith("cpu") else "wall time"
        parts += [f"catchup_mix alone at lam 0.5 (ms of {clock}, median of {meta['op_repeats']}):",
                  table(op_head, op_rows)]
    if "catchup" in results:
        c = results["catchup"]
        verdict = lambda v, t: "meets" if v <= t else "MISSES"  # noqa: E731
        parts.append(f"catchup vs none: step ratio {c['ratio']:.3f} {verdict(c['ratio'], TARGET_STEP_RATIO)} "
                     f"<= {TARGET_STEP_RATIO} (CPU time {c['cpu_ratio']:.3f}); "
                     f"peak-memory ratio {c['peak_mem_ratio']:.3f} "
                     f"{verdict(c['peak_mem_ratio'], TARGET_MEM_RATIO)} <= {TARGET_MEM_RATIO} "
                     f"(step-only {c['step_peak_mem_ratio']:.3f})")
    return "\n\n".join(parts)


def oversubscribed(meta: dict[str, Any]) -> list[str]:
    """A warning line when other processes already kept the CPUs busy: then timings are mostly noise
    (OpenMP threads that lose their core stall the whole operation)."""
    load = meta["load_before"]
    if meta["device"].startswith("cpu") and load and load[0] + meta["threads"] > meta["cpu_count"] + 0.5:
        advice = "try --threads 1 or a quiet machine" if meta["threads"] > 1 else "compare the CPU-time ratios"
        return [f"WARNING: load average {load[0]} before the run plus {meta['threads']} threads exceeds "
                f"{meta['cpu_count']} CPUs: wall times are unreliable ({advice})"]
    return []


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    entries, base, x = build_entries(args, device)
    measure(entries, args, device)
    summary = summarize(entries)
    results: dict[str, Any] = {n: r for n, r in summary.items() if "@" not in n}
    per_layer = {n: r for n, r in summary.items() if "@" in n}
    if per_layer:
        results["_catchup_per_layer"] = per_layer
        results["_feature_op"] = feature_op_table(base, x, summary["none"], args, device)
    results["_meta"] = {
        "model": args.model, "batch": args.batch_size, "input": args.input_size, "num_classes": args.num_classes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "amp": args.amp, "channels_last": args.channels_last, "repeats": args.repeats, "warmup": args.warmup,
        "op_repeats": args.op_repeats,
        "seed": args.seed, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "state_mb": entries[0].state_bytes / MB,
        "load_before": _rounded(load_before), "load_after": _rounded(load_average()),
        "targets": {"step_ratio": TARGET_STEP_RATIO, "peak_mem_ratio": TARGET_MEM_RATIO}}
    for e in entries:
        e.mixer.remove()
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _rounded(load: tuple[float, ...] | None) -> list[float] | None:
    return None if load is None else [round(v, 2) for v in load]


if __name__ == "__main__":
    run_cli(main)
