"""Autobahn|Testsuite conformance runner: Enjent's echo example against ``wstest``.

The Autobahn|Testsuite (``wstest -m fuzzingclient``, 517 cases) is the
WebSocket conformance suite. It runs on Python 2.7 only, so this runner
builds a Python 2.7 virtual environment with ``autobahntestsuite`` on first
use (from pyenv's 2.7, or any ``python2.7`` on ``PATH``; ``AB_PY27`` names
one), in ``AB_VENV`` (default: ``~/.cache/enjent/autobahn-py27``). Then it
starts ``examples/echo.py`` (or tests a server you started, ``--url``),
runs the cases, and reads the results.

    python -m tests.conformance.autobahn [--quick] [--workers N] [--url ws://...]
                                         [--cases 1.*,2.*] [--exclude 9.*]

A case passes when its behaviour is OK or INFORMATIONAL (NON-STRICT passes
too unless ``--strict``) and its close behaviour is OK or INFORMATIONAL.
Every case asked for must have a result. Exit status: 0 every case passed,
1 some case failed, 2 the run itself could not be done (no Python 2.7,
server not listening, ``wstest`` crashed or ran past ``--timeout``).
Loopback addresses only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
ECHO_EXAMPLE = REPO_ROOT / "examples" / "echo.py"
DEFAULT_VENV = Path.home() / ".cache" / "enjent" / "autobahn-py27"
#: Cases left out of a quick run: 9.* (limits and performance, minutes) and
#: 12.* / 13.* (permessage-deflate, most of the full run's time).
QUICK_EXCLUDE = ("9.*", "12.*", "13.*")
#: The echo server's limits for the 9.* cases (messages up to 16 MiB, and
#: bursts that a safe production write limit would refuse as slow consumers).
ECHO_LIMITS = (
    "--max-message-size", str(64 * 1024 * 1024),
    "--write-limit", str(64 * 1024 * 1024),
)  # fmt: skip
PASSING = ("OK", "INFORMATIONAL")
LOOPBACK = ("127.", "localhost", "::1", "[::1]")
AGENT = "enjent"


class HarnessError(RuntimeError):
    """The run could not be done (exit status 2), as opposed to a failed case."""


# ------------------------------------------------------------------ Python 2.7


def find_python27() -> str | None:
    """A Python 2.7 interpreter: ``AB_PY27``, pyenv's newest 2.7, or ``python2.7``."""
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [
        os.environ.get("AB_PY27", ""),
        *sorted(glob.glob(f"{pyenv_root}/versions/2.7*/bin/python"), reverse=True),
        shutil.which("python2.7") or "",
    ]
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (2, 7)"],
                capture_output=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:  # a pyenv shim without 2.7 installed fails here
            return candidate
    return None


def venv_dir() -> Path:
    return Path(os.environ.get("AB_VENV") or DEFAULT_VENV)


def _venv_ready(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not os.access(venv / "bin" / "wstest", os.X_OK) or not python.exists():
        return False
    done = subprocess.run(
        [str(python), "-c", "import autobahntestsuite"], capture_output=True, timeout=60
    )
    return done.returncode == 0


def ensure_venv(*, log: bool = True) -> Path:
    """The Python 2.7 venv with ``wstest``, built once (under a lock) if missing."""
    venv = venv_dir()
    if _venv_ready(venv):
        return venv
    python27 = find_python27()
    if python27 is None:
        raise HarnessError(
            "no Python 2.7 found (the Autobahn|Testsuite needs it): install one with "
            "`pyenv install 2.7.18`, or set AB_PY27 to its interpreter"
        )
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
        if _venv_ready(venv):
            return venv
        if log:
            print(f"autobahn: building {venv} with {python27} (once)", file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [python27, "-m", "pip", "install", "-q", "virtualenv"],
            [python27, "-m", "virtualenv", "-q", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", "autobahntestsuite"],
        ]
        has_virtualenv = subprocess.run(
            [python27, "-m", "virtualenv", "--version"], capture_output=True, timeout=60
        )
        if has_virtualenv.returncode == 0:
            steps = steps[1:]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise HarnessError(f"{' '.join(step)} failed:\n{done.stdout}{done.stderr}")
    if not _venv_ready(venv):
        raise HarnessError(f"{venv} has no working wstest after the install")
    return venv


def resolve_cases(venv: Path, cases: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The case ids that ``cases`` minus ``exclude`` select, as wstest resolves them."""
    program = (
        "import json, sys\n"
        "from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, "
        "CaseSetname, CaseBasename\n"
        "from autobahntestsuite.caseset import CaseSet\n"
        "spec = json.loads(sys.argv[1])\n"
        "case_set = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, "
        "CaseSubCategories)\n"
        "print(json.dumps(case_set.parseSpecCases(spec)))\n"
    )
    spec = json.dumps({"cases": list(cases), "exclude-cases": list(exclude)})
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", program, spec],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise HarnessError(f"cannot list the Autobahn cases:\n{done.stderr}")
    selected: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return selected


# ------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise HarnessError(f"the echo server exited with {process.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise HarnessError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@contextlib.contextmanager
def echo_server(workers: int, log_path: Path, extra: Sequence[str] = ()) -> Iterator[str]:
    """``examples/echo.py`` with the limits the 9.* cases need; yields its URL."""
    port = free_port()
    command = [
        sys.executable, str(ECHO_EXAMPLE), "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), *ECHO_LIMITS, *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_listening("127.0.0.1", port, 30.0, process)
        if workers > 1:
            time.sleep(1.0)  # every worker binds the port itself
        yield f"ws://127.0.0.1:{port}"
        if process.poll() is not None:
            raise HarnessError(f"the echo server died during the run (exit {process.returncode})")
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=10)


# --------------------------------------------------------------------- a run


@dataclass
class Summary:
    """What a run gave: the cases asked for, the failures, the counts by behaviour."""

    expected: int
    results: int
    failures: list[str] = field(default_factory=list)
    behaviours: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures and self.results == self.expected

    def line(self) -> str:
        counts = ", ".join(f"{count} {name}" for name, count in sorted(self.behaviours.items()))
        return (
            f"autobahn: {self.expected} cases, {len(self.failures)} failed "
            f"({self.results} results: {counts})"
        )


def summarize(index: dict[str, dict[str, dict[str, str]]], expected: Sequence[str],
              *, strict: bool) -> Summary:  # fmt: skip
    """Judge wstest's ``index.json`` against the cases asked for."""
    results = index.get(AGENT, {})
    summary = Summary(expected=len(expected), results=len(results))
    passing = (*PASSING, "NON-STRICT") if not strict else PASSING
    for case in expected:
        result = results.get(case)
        if result is None:
            summary.failures.append(f"{case}: no result")
            continue
        behaviour, close = result.get("behavior", "?"), result.get("behaviorClose", "?")
        summary.behaviours[behaviour] = summary.behaviours.get(behaviour, 0) + 1
        if behaviour not in passing or close not in PASSING:
            summary.failures.append(f"{case}: {behaviour}, close {close}")
    return summary


def run_wstest(url: str, cases: Sequence[str], outdir: Path, *, timeout: float) -> dict:
    venv = ensure_venv()
    host = urlsplit(url).hostname or ""
    if not host.startswith(LOOPBACK):
        raise HarnessError(f"{url}: loopback addresses only")
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": url}],
        "cases": list(cases),
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = outdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    with (outdir / "wstest.log").open("wb") as log:
        try:
            subprocess.run(
                [str(venv / "bin" / "wstest"), "-m", "fuzzingclient", "-s", str(spec_path)],
                cwd=outdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=True,
            )
        except subprocess.TimeoutExpired:
            raise HarnessError(f"wstest ran past {timeout:.0f} s") from None
        except subprocess.CalledProcessError as exc:
            tail = (outdir / "wstest.log").read_text(errors="replace")[-2000:]
            raise HarnessError(f"wstest exited with {exc.returncode}:\n{tail}") from None
    index_path = outdir / "index.json"
    if not index_path.exists():
        raise HarnessError(f"wstest wrote no {index_path}")
    index: dict = json.loads(index_path.read_text())
    return index


def conformance(
    *,
    quick: bool = False,
    cases: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    workers: int = 1,
    url: str | None = None,
    outdir: Path | None = None,
    strict: bool = True,
    timeout: float = 1800.0,
    server_args: Sequence[str] = (),
) -> Summary:
    """Run the cases against ``url``, or against the echo example started here."""
    venv = ensure_venv()
    excluded = [*exclude, *(QUICK_EXCLUDE if quick else ())]
    selected = resolve_cases(venv, cases, excluded)
    if not selected:
        raise HarnessError("no case selected")
    outdir = Path(outdir or tempfile.mkdtemp(prefix="enjent-autobahn-"))
    outdir.mkdir(parents=True, exist_ok=True)
    if url is None:
        with echo_server(workers, outdir / "server.log", server_args) as started:
            index = run_wstest(started, selected, outdir, timeout=timeout)
    else:
        index = run_wstest(url, selected, outdir, timeout=timeout)
    return summarize(index, selected, strict=strict)


def _patterns(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.autobahn",
        description="Run the Autobahn|Testsuite against examples/echo.py (or --url).",
    )
    parser.add_argument("--quick", action="store_true", help="leave out 9.*, 12.* and 13.*")
    parser.add_argument("--cases", action="append", default=[], help="case patterns (1.*,5.2)")
    parser.add_argument("--exclude", action="append", default=[], help="patterns to leave out")
    parser.add_argument("--workers", type=int, default=1, help="echo server workers (default 1)")
    parser.add_argument("--url", help="test this running ws:// echo server instead")
    parser.add_argument("--outdir", type=Path, help="report directory (default: a new temp one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="wstest's limit, seconds")
    parser.add_argument("--lenient", action="store_true", help="let NON-STRICT pass")
    parser.add_argument("--setup-only", action="store_true", help="only build the 2.7 venv")
    args = parser.parse_args(argv)
    try:
        if args.setup_only:
            print(f"autobahn: venv ready at {ensure_venv()}")
            return 0
        summary = conformance(
            quick=args.quick,
            cases=_patterns(args.cases) or ["*"],
            exclude=_patterns(args.exclude),
            workers=args.workers,
            url=args.url,
            outdir=args.outdir,
            strict=not args.lenient,
            timeout=args.timeout,
        )
    except HarnessError as exc:
        print(f"autobahn: {exc}", file=sys.stderr)
        return 2
    for failure in summary.failures[:50]:
        print(f"autobahn: FAILED {failure}")
    print(summary.line())
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
