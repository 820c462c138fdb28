"""Declares the optional C helper ``enjent._speedups`` (RFC 6455 §5.3 masking).

All metadata lives in ``pyproject.toml``. The extension is ``optional``: when it
cannot be compiled (no compiler, no Python headers) setuptools warns and the
install goes on, and ``enjent.mask`` uses its pure-Python fallback. Set
``ENJENT_NO_SPEEDUPS=1`` to skip the extension entirely.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup


def _speedups_wanted() -> bool:
    return os.environ.get("ENJENT_NO_SPEEDUPS", "") in ("", "0")


ext_modules = (
    [Extension("enjent._speedups", sources=["enjent/_speedups.c"], optional=True)]
    if _speedups_wanted()
    else []
)

setup(ext_modules=ext_modules)
