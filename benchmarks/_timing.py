"""Timing and memory helpers shared by the benchmarks: interleaved repetitions, per-step peak memory."""
from __future__ import annotations

import gc
import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# Read when torch loads: keeps the profiler used below for memory from logging errors about absent GPUs.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Step, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call, waiting for the device before and after (CUDA is asynchronous).

    The CPU time is this process's, all threads: on a machine shared with other jobs it counts the work
    done rather than the time spent waiting for a core, so it is the steadier of the two there (with
    several threads it also counts OpenMP's spin-waiting; on CUDA it measures only the host side).
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic-GC pause lands inside a timed call (it would hit whichever method happens to run then)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def interleaved_times(fns: dict[str, Step], repeats: int,
                      device: torch.device) -> dict[str, list[tuple[float, float]]]:
    """``repeats`` (wall, CPU) timings of every function, round-robin, the first function rotating each round.

    Round-robin spreads machine noise (other processes, thermal state) over all functions alike, and the
    rotation keeps any one of them from always running right after the same neighbour.
    """
    names = list(fns)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with gc_paused():
        for r in range(repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                times[name].append(time_once(fns[name], device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def step_peak_bytes(fn: Step, device: torch.device) -> int:
    """Peak bytes allocated during one call above what was allocated when it started.

    CUDA: the caching allocator's own counters. CPU has no such counters, so the profiler records every
    allocation and free of c10's CPU allocator (``profile_memory``) and the peak of their running sum is
    taken. That sees every tensor allocation, including kernels' scratch tensors and autograd buffers, but
    not memory that libraries obtain outside c10 (e.g. oneDNN's private scratchpads); it is exact where
    RSS deltas are not (RSS moves with the allocator's page reuse, not with tensor lifetimes). The
    profiler slows the call down, which is why time is never measured in the same pass.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results is the raw event list; the public FunctionEvent view folds allocations into the ops
    # and drops their order, which a running peak needs.
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):   # stable: same-time events keep their order
        live += nbytes
        peak = max(peak, live)
    return peak


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages (what ``uptime`` prints), or None where the OS has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None
