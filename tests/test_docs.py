"""The documentation: the site builds with --strict, its references cover every setting and
command of the code, the README stays a front door, and every benchmark run it cites exists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from archiver.cli import build_parser
from archiver.config import ENV_NAMES, Settings
from tests.helpers import REPO

DOCS = REPO / "docs"
RESULTS = REPO / "bench" / "results"
COMMANDS = list(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
# Pages the README links to that are written and added to the site with their own change.
LANDS_SEPARATELY = {"docs/deleting-history.md"}
CITED_RUN = re.compile(r"bench/results/([\w.-]+\.json)")


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def page_text(site: Path, name: str) -> str:
    html = (site / name / "index.html").read_text()
    return re.sub(r"<[^>]+>", "", html).replace("&#39;", "'").replace("&quot;", '"').replace("&amp;", "&")


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for page in DOCS.glob("*.md"):
        built = site / ("" if page.stem == "index" else page.stem) / "index.html"
        assert built.exists(), f"{page.name} was not built"


def test_every_setting_is_in_the_configuration_reference(site: Path) -> None:
    text = page_text(site, "configuration")
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description: the reference would have nothing to say"
        assert ENV_NAMES[name] in text, f"{ENV_NAMES[name]} is not in the configuration reference"
    assert "<!-- generated" not in (site / "configuration" / "index.html").read_text()


def test_every_command_and_its_options_are_in_the_command_reference(site: Path) -> None:
    text = page_text(site, "commands")
    for command in COMMANDS:
        assert f"desto-archiver {command}" in text, f"`{command}` is not in the command reference"
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"{command} {option} is not in the command reference"


def test_an_undocumented_setting_fails_the_build() -> None:
    hooks = script("mkdocs_hooks")
    field = Settings.model_fields["batch_size"]
    description, field.description = field.description, None
    try:
        with pytest.raises(hooks.UndocumentedError, match="batch_size"):
            hooks.settings_table()
    finally:
        field.description = description


def test_the_readme_is_a_front_door_whose_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert readme.splitlines()[2].startswith("[desto](https://github.com/kalfasyan/desto)")
    for command in (
        "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/desto-archiver run",
        "./scripts/test",
    ):
        assert command in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/deployment.md" in local and "docs/deleting-history.md" in local
    for link in local:
        if link not in LANDS_SEPARATELY:
            assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_every_cited_benchmark_run_exists_and_every_kept_run_is_cited() -> None:
    texts = [(REPO / "README.md").read_text(), *(page.read_text() for page in DOCS.glob("*.md"))]
    cited = {name for text in texts for name in CITED_RUN.findall(text)}
    assert cited, "the documentation cites no benchmark run"
    for name in cited:
        assert (RESULTS / name).exists(), f"bench/results/{name} is cited but does not exist"
    performance = (DOCS / "performance.md").read_text()
    for kept in RESULTS.glob("*.json"):
        assert kept.stem in performance, (
            f"{kept.name} is kept in bench/results/ but the performance page never cites it"
        )


def test_the_performance_tables_are_those_the_kept_runs_give() -> None:
    tables = script("bench_tables")
    page = (DOCS / "performance.md").read_text()
    assert tables.render(page) == page, "docs/performance.md is out of date: run scripts/bench_tables.py"
    for run in [*tables.HISTORY, *tables.SAME_RUN, tables.LATEST]:
        assert (RESULTS / f"{run}.json").exists()


def test_no_package_registry_is_named_anywhere() -> None:
    hosts = ["pypi" + ".org", "pythonhosted" + ".org", "npmjs" + ".org", "npmjs" + ".com", "crates" + ".io"]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for host in hosts:
            assert host not in text, f"{name} names {host}"
