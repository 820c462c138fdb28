"""``python -m enjent_supervisor`` is the ``enjent`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
