"""Benchmark helpers: torch set-up, interleaved timing with medians, peak memory of a fresh process, machine info."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# In a memory probe, glibc returns every freed block of >= 64 KiB to the OS at once (no heap caching, no dynamic
# threshold), so the resident set size follows the bytes of live tensors.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def setup_torch(threads: int) -> None:
    """Fixed intra-op threads and flushed denormals for every measurement."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def load() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``"0.42 0.61 0.80"``."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine since boot, and CPU seconds of this process and its waited-for children."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


class ForeignLoad:
    """``with ForeignLoad() as other: ...``; then ``other.cores``: the average number of cores that other processes
    kept busy while the block ran (machine busy time minus this process's, over wall time; Linux only)."""

    def __enter__(self) -> "ForeignLoad":
        self.cores = float("nan")
        self._start = (time.perf_counter(), *_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = (now - then for now, then in zip((time.perf_counter(), *_cpu_seconds()), self._start))
        self.cores = max(0.0, (busy - own) / wall)


def interleaved(cases: dict[str, Callable[[], None]], *, repeats: int, calls: int, warmup: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, list]:
    """Seconds per call of every case: ``warmup`` untimed calls each, then ``repeats`` rounds in which every case
    runs ``calls`` times in a row, the case order rotating by one each round. Returns one sample per round.
    ``sync`` waits for queued work (``torch.cuda.synchronize`` on a GPU) before each timer start and stop."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                cases[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for the queued work of ``device`` (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``min–max`` of the samples relative to their median, e.g. ``"-3%/+5%"``."""
    mid = median(values)
    return f"{min(values) / mid - 1:+.0%}/{max(values) / mid - 1:+.0%}"


def status_kib(field: str) -> int:
    """``VmRSS`` (now), ``VmHWM`` (peak since the last reset) or another size field of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def peak_rss_delta(fn: Callable[[], None]) -> int:
    """Bytes by which the peak resident set size while ``fn()`` runs exceeds the resident size just before it.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) first, reads ``VmHWM`` after. Meaningful
    in a process started with :data:`PROBE_ENV` (see :func:`run_probe`)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) * 1024


def peak_memory_delta(fn: Callable[[], None], device: str) -> int:
    """Bytes by which peak memory while ``fn()`` runs exceeds the memory just before it: on a GPU, of the bytes
    held by torch's caching allocator; on the CPU, :func:`peak_rss_delta`."""
    if torch.device(device).type != "cuda":
        return peak_rss_delta(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_probe(args: list[str]) -> dict:
    """Run ``python args...`` in a fresh process with :data:`PROBE_ENV`; it must print one JSON object as its last
    line of output, which is returned."""
    env = {**os.environ, **PROBE_ENV}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    """The accelerator's name (e.g. ``"NVIDIA H200"``), or the CPU model for ``"cpu"``."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    return {
        "CPU": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, flush denormal on",
        "python": platform.python_version(),
        "load average (1/5/15 min) at start": load(),
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
