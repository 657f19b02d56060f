"""The documentation: the site builds with --strict, its references cover every setting and
command of the code, the README stays a front door, and every benchmark run it cites exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from archiver import __version__
from archiver.archive.schema import SCHEMA_VERSION
from archiver.commands.cli import build_parser
from archiver.config import ENV_NAMES, Settings
from tests.helpers import REPO, script

DOCS = REPO / "docs"
RESULTS = REPO / "bench" / "results"
COMMANDS = list(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
# Pages the README links to that are written and added to the site with their own change.
CITED_RUN = re.compile(r"bench/results/([\w.-]+\.json)")


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
    for name, field in Settings.FIELDS.items():
        assert field.description, f"Settings.{name} has no description: the reference would have nothing to say"
        assert ENV_NAMES[name] in text, f"{ENV_NAMES[name]} is not in the configuration reference"


def test_every_command_and_its_options_are_in_the_command_reference(site: Path) -> None:
    text = page_text(site, "commands")
    for command in COMMANDS:
        assert f"desto-archiver {command}" in text, f"`{command}` is not in the command reference"
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"{command} {option} is not in the command reference"


def test_an_undocumented_setting_fails_the_generator() -> None:
    reference = script("docs_reference")
    field = Settings.FIELDS["batch_size"]
    description, field.description = field.description, None
    try:
        with pytest.raises(reference.UndocumentedError, match="batch_size"):
            reference.settings_table()
    finally:
        field.description = description


@pytest.mark.parametrize("page", ["configuration.md", "commands.md"])
def test_the_reference_tables_in_the_markdown_are_current(page: str) -> None:
    """GitHub shows the markdown as it is: the tables are written into it, never only at build time."""
    reference = script("docs_reference")
    text = (DOCS / page).read_text()
    assert "<!-- generated: " in text
    assert reference.render_tables(text, page) == text, f"docs/{page} is out of date: run scripts/docs_reference.py"


@pytest.fixture(scope="module")
def samples() -> dict[str, str]:
    """The sample outputs, made anew: the commands run against a redis-server and a daemon."""
    return script("docs_reference").samples()


def test_the_sample_outputs_in_the_markdown_are_current(samples: dict[str, str]) -> None:
    """Times, ids and numbers change from run to run; rows, columns, words and events do not."""
    reference = script("docs_reference")
    text = (DOCS / "commands.md").read_text()
    names = reference.sample_names(text)
    assert set(names) == set(samples), f"samples in the page {sorted(names)}, made {sorted(samples)}"
    fresh = reference.render_samples(text, samples, "commands.md")
    stale = [
        name
        for name in names
        if reference.normalize(reference.render_samples(text, {name: samples[name]}, "commands.md"))
        != reference.normalize(text)
    ]
    assert not stale, f"docs/commands.md's samples {stale} are out of date: run scripts/docs_reference.py"
    assert reference.normalize(fresh) == reference.normalize(text)
    # what normalize() masks but a reader relies on
    assert f"schema {SCHEMA_VERSION})" in samples["stats"] and f"version {SCHEMA_VERSION}" in samples["check"]
    assert f'"version": "{__version__}"' in samples["run"]


def test_a_stale_sample_is_seen() -> None:
    reference = script("docs_reference")
    text = (DOCS / "commands.md").read_text()
    stats = text.split("<!-- sample: stats -->\n", 1)[1].split("<!-- end sample -->", 1)[0]
    erased = next(line for line in stats.splitlines() if line.startswith("erased"))
    older = text.replace(stats, stats.replace(erased + "\n", ""))
    assert reference.normalize(older) != reference.normalize(text), "a line gone from a sample must show"
    assert reference.normalize(text.replace("2026-", "2027-").replace("0660", "0640")) == reference.normalize(text)


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
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_the_readme_quotes_the_reliability_page_s_own_figures() -> None:
    readme = (REPO / "README.md").read_text()
    [generated] = [
        line for line in (DOCS / "reliability.md").read_text().splitlines() if line.startswith("Generated by")
    ]
    scenarios, written, lost = re.search(
        r"(\d+) scenarios, ([\d,]+) records written,\s+([\d,]+) lost", " ".join(readme.split())
    ).groups()  # type: ignore[union-attr]
    assert f"{scenarios} scenarios" in generated and f"{written} records written, {lost} lost" in generated


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


def test_the_install_commands_name_the_clone_not_an_unpublished_distribution() -> None:
    """desto-archiver is installed from its clone (`pip install .`, `pip install -e '.[postgres]'`):
    no distribution of that name is published, so `pip install 'desto-archiver[postgres]'` fails as
    written. The changelog may quote an old message; every guide, and the code's own messages, may not."""
    by_name = re.compile(r"""pip install\s+(?:-\S+\s+)*['"]?desto-archiver(?![\w.-]*/)""")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name == "CHANGELOG.md" or name.startswith("tests/") or not name.endswith((".md", ".py", ".yml", ".toml")):
            continue
        text = " ".join((REPO / name).read_text(errors="replace").split())  # a command wrapped over lines
        found = by_name.search(text)
        assert not found, f"{name} says `{found.group(0)}...`, which fails: no such distribution is published"
