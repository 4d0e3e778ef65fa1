"""What every benchmark prints beside its numbers: machine, versions, timing helpers."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{device.type}: {name}",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_seconds(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """Median time of each function, calling them in turn ``repeats`` times (no warm-up): their
    ratios then share the machine's moments, which on a shared, noisy machine a separate
    measurement of each does not."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def cpu_peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during ``fn()`` above what it held before.

    Read from the profiler's memory events (each carries the allocator's running total), so every
    tensor allocation and free is seen, however short-lived; memory outside PyTorch's allocator
    (oneDNN scratch space, the Python heap) is not. Blocks allocated before the call and freed
    during it are not subtracted (the allocator's profile does not know their size), so the figure
    can only err high.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - before


def write_json(name: str, payload: dict) -> str:
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
