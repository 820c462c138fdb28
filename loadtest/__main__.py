"""Entry point of `python -m loadtest`; see `loadtest.cli`."""

from __future__ import annotations

import sys

from loadtest.cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:  # external publishers: a benchmark of its own
        from loadtest.publish_bench import main as publish_main

        sys.exit(publish_main(sys.argv[2:]))
    sys.exit(main())
