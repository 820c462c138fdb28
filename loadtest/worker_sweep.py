"""One scenario at several worker counts, interleaved, in one run.

    python -m loadtest.worker_sweep --workers 1,2,4 --repeat 3 -- fanout --clients 2000

Runs ``python -m loadtest <arguments> --workers W`` for each W, ``--repeat``
rounds of every W in turn (so drift on a shared machine hits each alike),
reads each run's JSON and prints the median of the chosen metrics per W
and their ratio to the first W. For the cost of a cross-worker broadcast:
``server_cpu_us_per_delivery`` (the server tree's CPU per client written
to) and ``fanout_deliveries_per_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_METRICS = "fanout_deliveries_per_s,server_cpu_us_per_delivery,fanout_last_p99_ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.worker_sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument(
        "--buses", default="zeromq", help="enjent buses to sweep too, e.g. zeromq,nats"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every count (default 3)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help="metrics to report")
    parser.add_argument("--json", type=Path, help="write the medians here too")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="-- then loadtest's")
    args = parser.parse_args(argv)
    forwarded = [a for a in args.arguments if a != "--"]
    if not forwarded:
        parser.error("give the loadtest scenario and its options after --")
    counts = [
        (int(part), bus)
        for bus in args.buses.split(",")
        if bus
        for part in args.workers.split(",")
        if part
    ]
    metrics = [name for name in args.metrics.split(",") if name]
    values: dict[tuple[int, str], dict[str, list[float]]] = {
        key: {m: [] for m in metrics} for key in counts
    }
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sweep-") as folder:
        for round_index in range(args.repeat):
            for workers, bus in counts:
                path = Path(folder) / f"{workers}-{bus}-{round_index}.json"
                command = [sys.executable, "-m", "loadtest", *forwarded, "--bus", bus]
                command += ["--workers", str(workers), "--json", str(path), "--no-chart", "--quiet"]
                done = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
                if done.returncode != 0 or not path.exists():
                    failures += 1
                    print(
                        f"run failed: {' '.join(command)} (exit {done.returncode})", file=sys.stderr
                    )
                    continue
                document = json.loads(path.read_text())
                for run in document["runs"]:
                    for name in metrics:
                        value = run.get("metrics", {}).get(name)
                        if isinstance(value, int | float):
                            values[workers, bus][name].append(float(value))
    medians: dict[str, Any] = {}
    print(f"{'workers/bus':>14} " + " ".join(f"{name:>30}" for name in metrics))
    first = f"{counts[0][0]}/{counts[0][1]}"
    for workers, bus in counts:
        label = f"{workers}/{bus}"
        row = {
            name: statistics.median(v) if v else float("nan")
            for name, v in values[workers, bus].items()
        }
        medians[label] = row
        cells = []
        for name in metrics:
            base = medians[first][name]
            ratio = row[name] / base if base else float("nan")
            cells.append(f"{row[name]:>20.2f} ({ratio:>5.2f}x)")
        print(f"{label:>14} " + " ".join(f"{cell:>30}" for cell in cells))
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "medians": medians}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
