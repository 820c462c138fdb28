"""Progress on stderr, the results table on stdout, the JSON file and the PNG chart.

Layer 5 of docs/architecture.md. Comparisons are medians over repeated runs and ratios of ours to
a peer measured in the same invocation (docs/architecture.md: report ratios, not absolute times).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO


def format_bytes(value: float) -> str:
    if math.isnan(value):
        return "-"
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{sign}{value:.1f} GiB"


class Progress:
    """One live status line on stderr (rewritten in place on a terminal, else throttled)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.label = ""
        self._tty = self.stream.isatty()
        self._last_line = 0.0
        self._extra = ""
        self._width = 0

    def start(self, label: str) -> None:
        self.label = label
        self._extra = ""

    def note(self, extra: str) -> None:
        """A trailing detail appended to the next update (e.g. the latest USS sample)."""
        self._extra = extra

    def update(self, text: str) -> None:
        if self.quiet:
            return
        line = f"[{self.label}] {text}" + (f" | {self._extra}" if self._extra else "")
        if self._tty:
            padding = " " * max(0, self._width - len(line))
            self.stream.write("\r" + line + padding)
            self._width = len(line)
            self.stream.flush()
        elif time.monotonic() - self._last_line >= 1.0:
            self._last_line = time.monotonic()
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, kept on screen."""
        if self.quiet:
            return
        self.done()
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._width = 0


def better(metric: str) -> str:
    """Which direction is better for a metric, judged from its name."""
    if metric.endswith("_per_s"):
        return "higher"
    if metric.endswith(("_ms", "_bytes", "_percent", "_failed", "_fds")):
        return "lower"
    return ""


def format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric.endswith("_bytes"):
        return format_bytes(value)
    if metric.endswith("_ms"):
        return f"{value:.3f} ms"
    if metric.endswith("_per_s"):
        return f"{value:,.0f}/s"
    if metric.endswith("_percent"):
        return f"{value:.1f} %"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3f}"


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Median of every metric over the runs of each server."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        per_server = values.setdefault(run["server"], {})
        for metric, value in run["metrics"].items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                per_server.setdefault(metric, []).append(float(value))
    return {
        server: {metric: statistics.median(seq) for metric, seq in metrics.items()}
        for server, metrics in values.items()
    }


def ratios(summary: Mapping[str, Mapping[str, float]], ours: str) -> dict[str, dict[str, float]]:
    """ours / peer for every metric both have (a ratio > 1 is good when higher is better)."""
    result: dict[str, dict[str, float]] = {}
    if ours not in summary:
        return result
    for peer, metrics in summary.items():
        if peer == ours:
            continue
        result[peer] = {
            metric: summary[ours][metric] / value
            for metric, value in metrics.items()
            if metric in summary[ours] and value not in (0, 0.0)
        }
    return result


def _table(rows: list[list[str]], stream: TextIO) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        stream.write("  ".join(cells).rstrip() + "\n")
        if number == 0:
            stream.write("  ".join("-" * width for width in widths) + "\n")


def spread(values: Sequence[float]) -> float:
    """The largest distance from the median, as a fraction of it (0.1: ±10 %)."""
    middle = statistics.median(values)
    return max(abs(value - middle) for value in values) / middle if middle else math.nan


def spread_rows(document: Mapping[str, Any], servers: list[str]) -> list[list[str]]:
    """With ``--repeat`` > 1: per throughput metric, every run, the spread, paired ratios."""
    runs = [run for run in document["runs"] if "metrics" in run]
    if not servers or document["config"].get("repeat", 1) < 2:
        return []
    by: dict[tuple[str, int], Mapping[str, Any]] = {
        (run["server"], run["repeat"]): run["metrics"] for run in runs
    }
    repeats = sorted({run["repeat"] for run in runs})
    ours, peers = servers[0], servers[1:]
    metrics = [
        m for m in dict.fromkeys(m for run in runs for m in run["metrics"]) if m.endswith("_per_s")
    ]
    rows = [["metric", "server", "runs", "±", *(f"ratio to {peer}" for peer in peers)]]
    for metric in metrics:
        for server in servers:
            values = [by[server, r][metric] for r in repeats if metric in by.get((server, r), {})]
            if len(values) < 2:
                continue
            row = [metric, server, " ".join(format_value(metric, v) for v in values)]
            row.append(f"{spread(values) * 100:.0f} %")
            for peer in peers:
                if server != ours:
                    row.append("")
                    continue
                paired = [
                    by[ours, r][metric] / by[peer, r][metric]
                    for r in repeats
                    if metric in by.get((ours, r), {}) and by.get((peer, r), {}).get(metric)
                ]
                cell = " ".join(f"{ratio:.2f}" for ratio in paired)
                row.append(f"{cell} (min {min(paired):.2f})" if paired else "-")
            rows.append(row)
    return rows if len(rows) > 1 else []


def print_report(document: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """The human-readable result: metrics (and ratios), per-process detail, failures."""
    out = stream if stream is not None else sys.stdout
    summary: dict[str, dict[str, float]] = document["summary"]
    servers = list(summary)
    cfg = document["config"]
    out.write(
        f"\nloadtest {document['scenario']}: clients={cfg['clients']} workers={cfg['workers']}"
        f" repeat={cfg['repeat']} loop={document['machine']['loop']}"
        f" cpus={document['machine']['cpu_count']}\n\n"
    )
    metrics = list(dict.fromkeys(m for server in servers for m in summary[server]))
    if not metrics:
        out.write("no run produced measurements\n")
        servers = []
    if servers:
        header = ["metric", *servers]
        ours = servers[0]
        peers = servers[1:]
        header += [f"{ours}/{peer}" for peer in peers]
        if peers:
            header.append("better")
        rows = [header]
        for metric in metrics:
            row = [metric, *(format_value(metric, summary[s].get(metric)) for s in servers)]
            for peer in peers:
                ratio = document["ratios"].get(peer, {}).get(metric)
                row.append("-" if ratio is None else f"{ratio:.2f}")
            if peers:
                row.append(better(metric))
            rows.append(row)
        _table(rows, out)
        spread = spread_rows(document, servers)
        if spread:
            out.write(
                "\nspread over the repeats (throughput metrics): each run's value, the "
                "median's ±, and each run's ratio to the peer measured next to it\n"
            )
            _table(spread, out)
    for run in document["runs"]:
        window = run.get("details", {}).get("window")
        if not window:
            continue
        out.write(
            f"\n{run['server']} (run {run['repeat'] + 1}): processes over the last "
            f"{window['window_s']:.1f} s window; load generator CPU "
            f"{window['loadgen_cpu_percent']:.1f} %\n"
        )
        process_rows = [["role", "pid", "cpu", "rss", "uss", "fds", "threads", "clients"]]
        for process in window["processes"]:
            connections = process.get("connections")
            process_rows.append(
                [
                    process["role"],
                    str(process["pid"]),
                    format_value("_percent", process["cpu_percent"]),
                    format_bytes(process["rss"]),
                    format_bytes(process["uss"]),
                    str(process["fds"]),
                    str(process["threads"]),
                    "-" if connections is None else str(connections),
                ]
            )
        _table(process_rows, out)
    failures = [(run["server"], failure) for run in document["runs"] for failure in run["failures"]]
    out.write("\n")
    for server, failure in failures:
        out.write(f"FAILED {server}: {failure}\n")
    out.write(("PASS" if document["ok"] else "FAIL") + "\n")


def _clean(value: Any) -> Any:
    """Replace NaN and infinities (not JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def write_json(document: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(document), indent=2, allow_nan=False) + "\n")


def write_chart(document: Mapping[str, Any], path: Path) -> str | None:
    """Draw the scenario's chart to `path`; return a one-line reason if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    scenario = document["scenario"]
    runs = document["runs"]
    if scenario == "connections":
        figure, axes = plt.subplots(figsize=(8, 5))
        for run in runs:
            points = run["series"].get("memory", [])
            if not points:
                continue
            label = f"{run['server']} #{run['repeat'] + 1}"
            clients = [point[0] for point in points]
            (line,) = axes.plot(clients, [p[1] / 2**20 for p in points], label=f"{label} USS")
            axes.plot(
                clients,
                [point[2] / 2**20 for point in points],
                "--",
                color=line.get_color(),
                alpha=0.5,
                label=f"{label} RSS (sum, counts shared pages per process)",
            )
        axes.set_xlabel("open connections")
        axes.set_ylabel("server memory, whole process tree (MiB)")
        axes.set_title("Memory vs. connections")
        panels = [axes]
    else:
        keys = list(dict.fromkeys(key for run in runs for key in run["series"]))
        if not keys:
            return "no latency recorded: no chart"
        figure, grid = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
        panels = list(grid[0])
        for axes, key in zip(panels, keys, strict=True):
            for run in runs:
                points = run["series"].get(key) or []
                if points:
                    axes.plot(
                        [p[1] for p in points],
                        [p[0] for p in points],
                        label=f"{run['server']} #{run['repeat'] + 1}",
                    )
            axes.set_xscale("log")
            axes.set_xlabel("latency (ms, log scale)")
            axes.set_ylabel("fraction of samples")
            axes.set_title(key.replace("_", " "))
    for axes in panels:
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"loadtest {scenario}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
