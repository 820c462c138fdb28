"""What a loopback ``send`` costs the kernel, with no WebSocket code at all.

Layer 5 of docs/architecture.md (it does not import ``enjent``). A sender
pinned to one CPU sends the same buffer over TCP on 127.0.0.1 to a reader
pinned to another, which only drains it; the sender's CPU time per send
(nearly all of it the kernel's) is reported per slice of the run, and each
run is a fresh pair of processes, as each repeat of ``loadtest echo`` starts
a fresh server. If the numbers of separate runs fall into two groups, the
machine's kernel has slow modes of its own, and a server whose own time per
message is small shows them as a large spread of its throughput::

    python -m loadtest.kernel_send [--size 16384] [--sends 4000] [--slices 4] [--runs 10]
        [--touch-mib 4096]

Bounded: ``runs x slices x sends`` sends, each run in its own processes. On
a virtual machine whose balloon device reports free pages to the host, the
settings of that reporting are printed too (they decide how often the
kernel's socket buffers land on memory the host must fault in again; see
loadtest/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import sys
import time
from pathlib import Path

_REPORTING = Path("/sys/module/page_reporting/parameters")


def _reader(port: int, cpu: int | None, buffer_size: int) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sink = bytearray(buffer_size)
        while sock.recv_into(sink):
            pass


def one_run(
    *, size: int, sends: int, slices: int, sender_cpu: int | None, reader_cpu: int | None
) -> list[float]:
    """CPU microseconds per ``send`` of ``size`` bytes, for each of ``slices`` slices."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(30)
        port = listener.getsockname()[1]
        child = os.fork()
        if child == 0:  # the reader: drains until the sender closes, then exits
            code = 0
            try:
                listener.close()
                _reader(port, reader_cpu, 1 << 20)
            except BaseException:
                code = 1
            os._exit(code)
        try:
            if sender_cpu is not None:
                os.sched_setaffinity(0, {sender_cpu})
            sock, _ = listener.accept()
            sock.settimeout(30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = memoryview(bytearray(b"x" * size))
            per_send: list[float] = []
            with sock:
                for _ in range(slices):
                    start = time.thread_time()
                    for _ in range(sends):
                        sock.sendall(payload)
                    per_send.append((time.thread_time() - start) / sends * 1e6)
        finally:
            _, status = os.waitpid(child, 0)
    if status != 0:
        raise RuntimeError(f"the reader process failed (wait status {status})")
    return per_send


def first_touch(mib: int) -> float:
    """CPU microseconds per 4 KiB page to write once to a fresh anonymous mapping of ``mib`` MiB.

    The page faults of a first write; on a VM they include the host's when the
    guest's free memory was given back to it.
    """
    size = mib << 20
    with mmap.mmap(-1, size) as area:
        start = time.thread_time()
        for offset in range(0, size, 4096):
            area[offset] = 1
        return (time.thread_time() - start) / (size // 4096) * 1e6


def reporting_settings() -> dict[str, str]:
    """The free-page reporting parameters of this kernel, if it has them."""
    settings: dict[str, str] = {}
    if _REPORTING.is_dir():
        for entry in sorted(_REPORTING.iterdir()):
            try:
                settings[entry.name] = entry.read_text().strip()
            except OSError:
                continue
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="bytes per send")
    parser.add_argument("--sends", type=int, default=4000, help="sends per slice")
    parser.add_argument("--slices", type=int, default=4, help="slices per run")
    parser.add_argument("--runs", type=int, default=10, help="runs, each in fresh processes")
    parser.add_argument("--sender-cpu", type=int, default=0, help="CPU of the sender (-1: any)")
    parser.add_argument("--reader-cpu", type=int, default=1, help="CPU of the reader (-1: any)")
    parser.add_argument(
        "--touch-mib",
        type=int,
        default=0,
        help="also time the first write to each page of N MiB of new memory, twice",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.size, args.sends, args.slices, args.runs) < 1:
        parser.error("--size, --sends, --slices and --runs must be at least 1")
    cpus = os.sched_getaffinity(0)
    for name in ("sender_cpu", "reader_cpu"):
        cpu = getattr(args, name)
        if cpu >= 0 and cpu not in cpus:
            parser.error(
                f"--{name.replace('_', '-')} {cpu}: this process may use CPUs {sorted(cpus)}"
            )
    sender = args.sender_cpu if args.sender_cpu >= 0 else None
    reader = args.reader_cpu if args.reader_cpu >= 0 else None
    runs = []
    for number in range(1, args.runs + 1):
        figures = one_run(
            size=args.size,
            sends=args.sends,
            slices=args.slices,
            sender_cpu=sender,
            reader_cpu=reader,
        )
        runs.append(figures)
        shown = " ".join(f"{value:6.2f}" for value in figures)
        print(f"run {number:3d}: {shown}  µs of CPU per {args.size} B send", flush=True)
    medians = [statistics.median(figures) for figures in runs]
    low, high = min(medians), max(medians)
    print(
        f"run medians: {low:.2f}-{high:.2f} µs per send (the slowest {high / low:.2f}x the fastest)"
    )
    settings = reporting_settings()
    if settings:
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        print(f"free page reporting to the host: {shown}")
    touches = [first_touch(args.touch_mib) for _ in range(2)] if args.touch_mib > 0 else []
    if touches:
        print(
            f"first write to a new page ({args.touch_mib} MiB): {touches[0]:.2f} µs, "
            f"then {touches[1]:.2f} µs on memory just freed"
        )
    if args.json is not None:
        report = {
            "size": args.size,
            "sends": args.sends,
            "runs": runs,
            "reporting": settings,
            "first_touch_us": touches,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
