"""Autobahn|Testsuite conformance of ``examples/echo.py`` (RFC 6455 end to end).

Uses the repository's own runner, :mod:`conformance.autobahn` (it builds its
Python 2.7 environment on first use). Our bar: every case OK or
INFORMATIONAL, none NON-STRICT, at one worker and at several. The quick
runs (~15 s each) are part of the default suite; the full one (517 cases,
permessage-deflate included) is marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance.autobahn import HarnessError, conformance, ensure_venv, find_python27

pytestmark = pytest.mark.autobahn

QUICK_CASES = 247
ALL_CASES = 517


@pytest.fixture(scope="module")
def wstest() -> Path:
    """The Python 2.7 venv with wstest; skipped (saying why) only without any Python 2.7."""
    if find_python27() is None:
        try:
            return ensure_venv(log=False)  # an AB_VENV built elsewhere still works
        except HarnessError as exc:
            pytest.skip(str(exc))
    return ensure_venv()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_autobahn_quick(wstest: Path, workers: int, tmp_path: Path) -> None:
    """Every case but 9.* (limits) and 12.*/13.* (permessage-deflate)."""
    summary = conformance(quick=True, workers=workers, outdir=tmp_path, timeout=480)
    assert summary.expected == QUICK_CASES
    assert summary.passed, "\n".join([summary.line(), *summary.failures[:40]])


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_autobahn_full(wstest: Path, tmp_path: Path) -> None:
    """All 517 cases, permessage-deflate (12.*, 13.*) included: ~8 min on a quiet machine."""
    summary = conformance(workers=1, outdir=tmp_path, timeout=1800)
    assert summary.expected == ALL_CASES
    assert summary.passed, "\n".join([summary.line(), *summary.failures[:40]])
