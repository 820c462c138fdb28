"""Guards that keep the architecture as docs/architecture.md draws it.

- Layers: the protocol core (``enjent/*.py``) imports only the core, and
  nothing of asyncio, sockets, ZeroMQ or uvloop; the server layer
  (``enjent/server/``) imports the core and itself; the cluster layer
  (``enjent/cluster/``) the core, the server layer and itself; the supervisor
  (``supervisor/``) anything.
- No import cycle among the library's modules (imports run at import time).
- No module reads another object's private attribute (``other._name``).
- Nothing in the repository points to a file outside it.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = "core"
LAYER_ORDER = {CORE: 1, "server": 2, "cluster": 3, "supervisor": 4}
#: What the core may never import: it is bytes in, events and bytes out.
NO_IO = {"asyncio", "socket", "selectors", "zmq", "uvloop", "msgpack", "ssl"}
#: Private names of other modules that are a documented API (CPython's own).
PRIVATE_ALLOWED = {"os._exit"}


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module of the library."""
    for path in sorted((REPO_ROOT / "enjent").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path
    for path in sorted((REPO_ROOT / "supervisor").rglob("*.py")):
        parts = (
            "enjent_supervisor",
            *path.relative_to(REPO_ROOT / "supervisor").with_suffix("").parts,
        )
        yield ".".join(p for p in parts if p != "__init__"), path


def layer_of(module: str) -> str | None:
    if module.startswith("enjent_supervisor"):
        return "supervisor"
    parts = module.split(".")
    if parts[0] != "enjent":
        return None
    if len(parts) == 1 or parts[1] == "__main__":
        return None  # the package's facade and entry point re-export every layer
    if parts[1] in ("server", "cluster"):
        return parts[1]
    return CORE


def resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The modules an ``import from`` names (relative ones resolved)."""
    if node.level:
        package = module.split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        base = package[: len(package) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        found.append(candidate if candidate in MODULES else target)
    return found


def imports(module: str, path: Path, *, runtime_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) of ``module``; ``runtime_only`` skips TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            for target in resolve(module, path, node):
                yield target, node.lineno


MODULES = dict(modules())


def test_the_layers_are_folders() -> None:
    assert (REPO_ROOT / "enjent" / "server" / "__init__.py").is_file()
    assert (REPO_ROOT / "enjent" / "cluster" / "__init__.py").is_file()
    core = {name for name in MODULES if layer_of(name) == CORE}
    assert {"enjent.frames", "enjent.protocol", "enjent.http11", "enjent.deflate"} <= core


def test_every_import_goes_down_the_layers() -> None:
    problems = []
    for module, path in MODULES.items():
        layer = layer_of(module)
        if layer is None:
            continue
        for target, line in imports(module, path, runtime_only=False):
            top = target.split(".")[0]
            if layer == CORE and top in NO_IO:
                problems.append(f"{path.name}:{line}: the core imports {target}")
            target_layer = layer_of(target)
            if target_layer is None:
                continue
            if target == "enjent" and layer != "supervisor":
                problems.append(f"{module}:{line}: imports the package facade")
            elif LAYER_ORDER[target_layer] > LAYER_ORDER[layer]:
                problems.append(f"{module}:{line}: {layer} layer imports {target} ({target_layer})")
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    graph = {
        module: {
            target
            for target, _ in imports(module, path, runtime_only=True)
            if target in MODULES and target != module
        }
        for module, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycle = [*trail[trail.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def private_reads(path: Path) -> Iterator[str]:
    """``other._name`` reads: an underscore attribute of anything but ``self``/``cls``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        text = ast.unparse(node)
        if text in PRIVATE_ALLOWED:
            continue
        yield f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {text}"


def test_no_module_reads_another_objects_private_attributes() -> None:
    found = [read for _, path in MODULES.items() for read in private_reads(path)]
    assert not found, "\n".join(found)


def test_the_front_object_is_small() -> None:
    app = (REPO_ROOT / "enjent" / "server" / "app.py").read_text()
    assert len(app.splitlines()) < 865 // 2  # the old server.py had 865 lines
    assert "cluster is None" not in app


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not available")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".toml", ".cfg", ".conf", ".service", ".html", ".rst", ".txt", ""}
    return [
        REPO_ROOT / name
        for name in listed.stdout.splitlines()
        if Path(name).suffix in suffixes and (REPO_ROOT / name).is_file()
    ]


def test_nothing_points_outside_the_repository() -> None:
    # spelled in parts, so that this file does not name them itself
    outside = ["../" + "shared", "shared" + "/tools", "DESIGN" + ".md", "STYLE" + ".md"]
    problems = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for needle in outside:
            if needle in text:
                problems.append(f"{path.relative_to(REPO_ROOT)} mentions {needle}")
    assert not problems, "\n".join(problems)


def test_the_load_generator_never_imports_enjent() -> None:
    """loadtest is a client of the wire protocol; only its micro-benchmarks import enjent."""
    # cluster_app.py and publish_app.py are not generators either: they are the apps the
    # servers under test run; publish_bench.py's publisher process is what it measures
    # (enjent's Publisher), its receivers speak only the wire protocol
    benches = {
        "publish_app.py",
        "publish_bench.py",
        "history_app.py",
        "parser_bench.py",
        "room_bench.py",
        "deflate_memory.py",
        "hangup_bench.py",
        "echo_path.py",
        "cluster_app.py",
    }
    importers = []
    for path in sorted((REPO_ROOT / "loadtest").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(name == "enjent" or name.startswith("enjent.") for name in names):
                importers.append(path.name)
    assert set(importers) == benches


def test_every_option_is_an_attribute_of_the_server() -> None:
    from enjent import WebSocketServer
    from enjent.server.options import OptionView, ServerOptions

    views = {
        name
        for klass in WebSocketServer.__mro__
        for name, value in vars(klass).items()
        if isinstance(value, OptionView)
    }
    assert views == set(ServerOptions.names())
    server = WebSocketServer(close_timeout=2, max_message_size=1000)
    assert server.close_timeout == 2.0 and server.max_message_size == 1000
    server.configure(close_timeout=3)
    assert server.options.timeouts.close_timeout == 3.0 == server.close_timeout
