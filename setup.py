"""Declares the optional C helper ``enjent._speedups`` (RFC 6455 §5.3 masking).

All static metadata lives in ``pyproject.toml``; the list of packages is
found here (:func:`_packages`), so that a new subpackage is never left out
of the wheel. The extension is ``optional``: when it
cannot be compiled (no compiler, no Python headers) setuptools warns and the
install goes on, and ``enjent.mask`` uses its pure-Python fallback. Set
``ENJENT_NO_SPEEDUPS=1`` to skip the extension entirely.
"""

from __future__ import annotations

import os

from setuptools import Extension, find_packages, setup


def _speedups_wanted() -> bool:
    return os.environ.get("ENJENT_NO_SPEEDUPS", "") in ("", "0")


ext_modules = (
    [Extension("enjent._speedups", sources=["enjent/_speedups.c"], optional=True)]
    if _speedups_wanted()
    else []
)


def _packages() -> list[str]:
    """Every package of the distribution, found on disk (never listed by hand).

    ``enjent`` and its subpackages as they are; the repository folder
    ``supervisor/`` and its subpackages under the name ``enjent_supervisor``
    (``package-dir`` in pyproject.toml maps the name back to the folder).
    """
    found = find_packages(include=["enjent", "enjent.*"])
    for name in find_packages(include=["supervisor", "supervisor.*"]):
        found.append("enjent_supervisor" + name[len("supervisor") :])
    return sorted(found)


setup(ext_modules=ext_modules, packages=_packages())
