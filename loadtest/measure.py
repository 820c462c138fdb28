"""psutil measurements of the server's process tree and of the load generator itself.

Layer 5 of docs/architecture.md. Memory is summed over the tree (supervisor and workers): RSS, and
USS from `memory_full_info` (pages only that process holds, so sums do not double-count
shared pages). CPU is measured per process over a window, next to the load generator's
own CPU, so a reader can tell which side was the bottleneck.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0..1) percentile of already sorted values, nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(seconds: Sequence[float], prefix: str) -> dict[str, float]:
    """p50 / p90 / p99 / max of latencies in seconds, as milliseconds."""
    ordered = sorted(seconds)
    return {
        f"{prefix}_p50_ms": percentile(ordered, 0.50) * 1000,
        f"{prefix}_p90_ms": percentile(ordered, 0.90) * 1000,
        f"{prefix}_p99_ms": percentile(ordered, 0.99) * 1000,
        f"{prefix}_max_ms": (ordered[-1] * 1000) if ordered else math.nan,
    }


@dataclass
class MemorySample:
    """Memory of the whole tree at one moment."""

    rss: int
    uss: int
    fds: int
    processes: int


@dataclass
class ProcessReport:
    """One process of the tree over a measured window."""

    pid: int
    role: str
    cpu_percent: float
    rss: int
    uss: int
    fds: int
    threads: int
    connections: int | None = None


@dataclass
class CpuWindow:
    """CPU times at the start of a window, to be closed by `TreeSampler.end_window`."""

    started: float
    server_times: dict[int, float]
    loadgen_times: float
    system: Any = field(default=None)


class TreeSampler:
    """Samples a process tree given by `processes()` (root first)."""

    def __init__(self, processes: Callable[[], list[psutil.Process]]) -> None:
        self._processes = processes
        self._self = psutil.Process(os.getpid())

    def memory(self) -> MemorySample:
        rss = uss = fds = count = 0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                rss += info.rss
                uss += info.uss
                fds += process.num_fds()
                count += 1
        return MemorySample(rss=rss, uss=uss, fds=fds, processes=count)

    def begin_window(self) -> CpuWindow:
        times: dict[int, float] = {}
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
        own = self._self.cpu_times()
        psutil.cpu_percent(percpu=True)  # resets the system-wide counters
        return CpuWindow(time.perf_counter(), times, own.user + own.system)

    def end_window(self, window: CpuWindow, *, port: int | None = None) -> dict[str, Any]:
        """Close `window`: CPU % per process (100 = one core), memory, fds, and the load
        generator's own CPU %. With the server's `port`, also count each process's
        established connections on it (how clients spread over workers) and tell
        workers (listening) from helpers such as a bus broker.
        """
        # CPU first, all at once, so that the slower reads below stay out of the window.
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        own = self._self.cpu_times()
        loadgen = 100.0 * ((own.user + own.system) - window.loadgen_times) / elapsed
        per_cpu = psutil.cpu_percent(percpu=True)
        processes = self._processes()
        cpu_used: dict[int, float] = {}
        for process in processes:
            with contextlib.suppress(psutil.Error):
                cpu = process.cpu_times()
                before = window.server_times.get(process.pid)
                cpu_used[process.pid] = (
                    (cpu.user + cpu.system) - before if before is not None else math.nan
                )
        reports: list[ProcessReport] = []
        for position, process in enumerate(processes):
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                connections = listening = 0
                if port is not None:
                    for conn in process.net_connections(kind="tcp"):
                        if conn.laddr and conn.laddr.port == port:
                            listening += conn.status == psutil.CONN_LISTEN
                            connections += conn.status == psutil.CONN_ESTABLISHED
                if position == 0:
                    role = "supervisor" if len(processes) > 1 else "server"
                else:
                    role = "worker" if listening or port is None else "helper"
                reports.append(
                    ProcessReport(
                        pid=process.pid,
                        role=role,
                        cpu_percent=100.0 * cpu_used.get(process.pid, math.nan) / elapsed,
                        rss=info.rss,
                        uss=info.uss,
                        fds=process.num_fds(),
                        threads=process.num_threads(),
                        connections=connections if port is not None else None,
                    )
                )
        return {
            "window_s": elapsed,
            "server_cpu_percent": sum(
                r.cpu_percent for r in reports if not math.isnan(r.cpu_percent)
            ),
            "loadgen_cpu_percent": loadgen,
            "system_cpu_percent": per_cpu,
            "server_rss_bytes": sum(r.rss for r in reports),
            "server_uss_bytes": sum(r.uss for r in reports),
            "server_fds": sum(r.fds for r in reports),
            "processes": [vars(r) for r in reports],
        }
