"""How the test suite itself is laid out: what a developer relies on when running part of it."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_the_unit_tests_run_without_desto_and_without_servers(tmp_path: Path) -> None:
    """``pytest -m unit`` is the quick loop: it must not need desto installed (its classes drive
    only the integration tests) nor start a redis-server or a daemon."""
    blocked = tmp_path / "blocked" / "desto"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("desto is not installed here")\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "unit", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        # no redis-server on this PATH (nor anything else): a unit test that starts one fails
        env={"PATH": str(tmp_path / "empty"), "PYTHONPATH": str(blocked.parent), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


# The rooms of the package, from the one that may import every other to the one that imports none:
# a module imports modules of its own room and of the rooms after it, never of one before it.
# "" is the top of the package: what every room shares (kinds, keys, models, config, log, output).
ROOMS = ("commands", "daemon", "central", "archive", "redis_side", "")
ENTRY_POINTS = {"__main__"}  # `python -m archiver`: above every room


def _modules(package: Path) -> dict[str, Path]:
    """Each module of the package by its name below ``archiver.`` (``daemon.fetcher``, ``kinds``);
    a subpackage's ``__init__`` by the subpackage's name."""
    modules: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts) or "__init__"] = path
    return modules


def archiver_imports(package: Path = REPO / "archiver") -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports, wherever in it the import
    is (lazy ones inside functions and those for the type checker count too)."""
    modules = _modules(package)

    def resolve(dotted: str) -> str:
        """The module a dotted name below ``archiver.`` is, or the one that holds it."""
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or "__init__"

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: a relative import; the package imports itself by full names")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "archiver":
                below = node.module.partition(".")[2]
                for alias in node.names:  # `from archiver.room import module`, or a name of a module
                    imported.add(resolve(f"{below}.{alias.name}".lstrip(".")))
            elif isinstance(node, ast.Import):
                imported.update(resolve(a.name.partition(".")[2]) for a in node.names if a.name.startswith("archiver."))
        graph[name] = imported - {name}
    return graph


def room_of(module: str) -> str:
    """The room a module is in: its subpackage, or "" at the top of the package."""
    head = module.split(".")[0]
    return head if head in ROOMS else ""


def test_the_package_s_imports_go_one_way() -> None:
    """A module never imports one that imports it, directly or through others: each can be read,
    tested and changed from the modules below it (docs/development.md, "Layout")."""
    graph = archiver_imports()
    assert {"daemon.pipeline", "daemon.fetcher", "archive.store", "kinds"} <= graph.keys()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        raise AssertionError(f"an import cycle: {' -> '.join(cycle.args[1])}") from None
    assert order.index("kinds") < order.index("archive.store") < order.index("daemon.pipeline")
    assert order.index("daemon.pipeline") < order.index("commands.cli")


def against_the_rooms(graph: dict[str, set[str]]) -> list[str]:
    """The imports of a module from a room before its own."""
    return sorted(
        f"{module} ({room_of(module) or 'top'}) imports {target} ({room_of(target) or 'top'})"
        for module, targets in graph.items()
        if module not in ENTRY_POINTS
        for target in targets
        if target != "__init__" and ROOMS.index(room_of(target)) < ROOMS.index(room_of(module))
    )


def test_the_rooms_import_one_way() -> None:
    """The rooms are in order: commands, daemon, central, archive, the Redis side, and the top of
    the package they all share. A module imports from its own room and the rooms after it; an
    import of a room before it (lazy, or for the type checker, alike) is the architecture broken."""
    graph = archiver_imports()
    rooms = {name.split(".")[0] for name in graph if "." in name}
    assert rooms == set(ROOMS) - {""}, f"subpackages with no place in ROOMS (or gone): {sorted(rooms ^ set(ROOMS))}"
    against = against_the_rooms(graph)
    assert not against, "imports against the rooms' order:\n  " + "\n  ".join(against)


def test_the_rooms_check_finds_lazy_and_type_checking_imports_against_the_order(tmp_path: Path) -> None:
    """A package laid out like this one, whose Redis side imports the archive for the type checker
    and the daemon inside a function, and whose top imports a room: all three are found."""
    package = tmp_path / "archiver"
    for name, text in {
        "__init__.py": "",
        "kinds.py": "from archiver.redis_side import source\n",
        "redis_side/__init__.py": "",
        "redis_side/source.py": (
            "from typing import TYPE_CHECKING\n"
            "from archiver import kinds\n"
            "if TYPE_CHECKING:\n    from archiver.archive.store import Store\n"
            "def later():\n    from archiver.daemon import fetcher\n"
        ),
        "archive/__init__.py": "",
        "archive/store.py": "from archiver.redis_side.source import later\nimport archiver.kinds\n",
        "daemon/__init__.py": "",
        "daemon/fetcher.py": "from archiver.archive.store import Store\nfrom archiver import kinds\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = archiver_imports(package)
    assert graph["archive.store"] == {"redis_side.source", "kinds"}
    assert against_the_rooms(graph) == [
        "kinds (top) imports redis_side.source (redis_side)",
        "redis_side.source (redis_side) imports archive.store (archive)",
        "redis_side.source (redis_side) imports daemon.fetcher (daemon)",
    ]


def _layout() -> dict[str, set[str]]:
    """docs/development.md's layout: the modules it lists in each room ("" for the top)."""
    layout = (REPO / "docs" / "development.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    block = layout.split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    room = ""
    for line in block.splitlines():
        heading = re.match(r"^  ([a-z_]+)/", line)
        if heading:
            room = heading[1] if heading[1] in ROOMS else ""
            continue
        if re.match(r"^  \S", line):  # back at the top of the package
            room = ""
        for name in re.findall(r"\b([a-z_]+)\.py\b", line):
            listed.setdefault(room, set()).add(name)
    return listed


def test_every_module_of_the_package_is_in_the_development_guide_s_layout() -> None:
    listed = _layout()
    missing = sorted(
        name
        for name in archiver_imports()
        if name.rpartition(".")[2] not in listed.get(room_of(name), set()) | {"__init__", "__main__"}
        and name not in set(ROOMS)
    )
    assert not missing, f"modules missing from docs/development.md's layout (or under another room): {missing}"
