"""``python -m enjent``: the ``enjent`` command line (``enjent run MODULE:ATTR``)."""

from __future__ import annotations

import importlib
import sys

# the command line belongs to the supervisor layer, above this package
sys.exit(importlib.import_module("enjent_supervisor.cli").main())
