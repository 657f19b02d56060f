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


def archiver_imports() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports, wherever in it the import
    is (lazy ones inside functions and those for the type checker count too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "archiver").glob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "archiver":
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("archiver."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("archiver."))
        graph[path.stem] = imported - {path.stem}
    return graph


def test_the_package_s_imports_go_one_way() -> None:
    """A module never imports one that imports it, directly or through others: each can be read,
    tested and changed from the modules below it (docs/development.md, "Layout")."""
    graph = archiver_imports()
    assert {"pipeline", "fetcher", "store", "kinds"} <= graph.keys()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        raise AssertionError(f"an import cycle: {' -> '.join(cycle.args[1])}") from None
    assert order.index("kinds") < order.index("store") < order.index("pipeline") < order.index("cli")


def test_every_module_of_the_package_is_in_the_development_guide_s_layout() -> None:
    layout = (REPO / "docs" / "development.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("##", 1)[0]
    listed = set(re.findall(r"\b([a-z_]+)\.py\b", layout))
    missing = sorted(set(archiver_imports()) - listed - {"__init__", "__main__"})
    assert not missing, f"modules missing from docs/development.md's layout: {missing}"
