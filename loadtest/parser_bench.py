"""Micro-benchmark of Enjent's protocol core: frames parsed per second, unmask MB/s.

Unlike the rest of ``loadtest`` (a client that only speaks the wire
protocol), this one imports ``enjent`` on purpose: it times the parser and
the masking helper in-process, with no sockets, to see where a read's CPU
goes. Seeded and bounded::

    python -m loadtest.parser_bench [--seconds 1.0] [--json PATH]

For each message size it feeds one buffer of many masked client frames to
``ServerProtocol.receive_data`` and reports frames/s and MB/s; then it
times ``apply_mask`` (the C helper when built) and the pure-Python fallback
on the same payloads and reports both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable

from enjent.frames import encode_frame
from enjent.mask import HAVE_SPEEDUPS, apply_mask, apply_mask_python
from enjent.protocol import ServerProtocol

SIZES = (32, 1024, 16384, 1 << 20)


def _rate(function: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``function`` over about ``seconds`` (at least 3 calls)."""
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while calls < 3 or time.perf_counter() < deadline:
        function()
        calls += 1
    return calls / (time.perf_counter() - start)


def run(seconds: float, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    mask = bytes(rng.randrange(256) for _ in range(4))
    results: dict[str, object] = {"speedups": HAVE_SPEEDUPS, "parse": [], "mask": []}
    for size in SIZES:
        payload = bytes(rng.randrange(256) for _ in range(min(size, 4096))) * (max(1, size // 4096))
        payload = payload[:size]
        frame = encode_frame(2, payload, mask=mask)
        count = max(4, (1 << 20) // len(frame))
        buffer = frame * count
        protocol = ServerProtocol(max_message_size=1 << 24)
        per_second = _rate(lambda p=protocol, b=buffer: p.receive_data(b), seconds)
        results["parse"].append(  # type: ignore[attr-defined]
            {
                "size": size,
                "frames_per_s": round(per_second * count),
                "mb_per_s": round(per_second * len(buffer) / 1e6, 1),
            }
        )
        fast = _rate(lambda data=payload: apply_mask(data, mask), seconds / 2)
        slow = _rate(lambda data=payload: apply_mask_python(data, mask), seconds / 2)
        results["mask"].append(  # type: ignore[attr-defined]
            {
                "size": size,
                "apply_mask_mb_per_s": round(fast * size / 1e6, 1),
                "python_mb_per_s": round(slow * size / 1e6, 1),
                "ratio": round(fast / slow, 2),
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 30:
        parser.error("--seconds must be in (0, 30]")
    results = run(args.seconds, args.seed)
    print(f"C mask helper built: {results['speedups']}")
    print(f"{'size':>9}  {'frames/s':>12}  {'parse MB/s':>10}")
    for row in results["parse"]:  # type: ignore[attr-defined]
        print(f"{row['size']:>9}  {row['frames_per_s']:>12,}  {row['mb_per_s']:>10}")
    print(f"{'size':>9}  {'unmask MB/s':>11}  {'python MB/s':>11}  {'ratio':>6}")
    for row in results["mask"]:  # type: ignore[attr-defined]
        print(
            f"{row['size']:>9}  {row['apply_mask_mb_per_s']:>11}  "
            f"{row['python_mb_per_s']:>11}  {row['ratio']:>6}"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
