"""The repository's habits, each checked by its own tool where one exists: the GitHub workflows
(actionlint, and zizmor offline), dependabot (zizmor's strict collection), pre-commit
(its validate-config), the package metadata, and what each of them must name."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s+([\w.-]+/[\w./-]+)@([0-9a-f]{40}) # v\d+(?:\.\d+){0,2}\s*$")


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the test extra installs it (pip install -e '.[test]', or scripts/test)")
    return str(path)


def workflow(name: str) -> dict[str, Any]:
    document: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def uses(job: dict[str, Any]) -> list[str]:
    return [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step]


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    shellcheck = shutil.which("shellcheck")  # checks the run: scripts too where it is installed
    return subprocess.run(
        [tool("actionlint"), "-no-color", f"-shellcheck={shellcheck or ''}", *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def zizmor(root: Path) -> subprocess.CompletedProcess[str]:
    """Offline (no GitHub API: the audits that need it are left out), pedantic, and failing on a
    file it cannot read rather than skipping it."""
    return subprocess.run(
        [
            tool("zizmor"),
            "--offline",
            "--no-progress",
            "--color=never",
            "--persona=pedantic",
            "--strict-collection",
            "--collect=all",
            "--",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root), "ZIZMOR_OFFLINE": "true"},
    )


# ─── the workflows, as their tools see them ──────────────────────────────────────────────────────


def test_the_workflows_pass_actionlint() -> None:
    result = actionlint(*sorted(WORKFLOWS.glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_workflows_dependabot_and_pre_commit_pass_zizmor_offline() -> None:
    result = zizmor(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ["dependabot.yml", *(f"workflows/{p.name}" for p in WORKFLOWS.glob("*.yml"))]:
        assert f".github/{name}" in result.stderr, f"zizmor did not audit .github/{name}:\n{result.stderr}"


def test_a_broken_workflow_fails_actionlint_and_an_unpinned_one_fails_zizmor(tmp_path: Path) -> None:
    ci = (WORKFLOWS / "ci.yml").read_text()
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(ci.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n    needs: no-such-job", 1))
    result = actionlint(broken)
    assert result.returncode == 1 and "no-such-job" in result.stdout, result.stdout + result.stderr

    [pin] = set(re.findall(r"actions/checkout@[0-9a-f]{40}", ci))
    broken.write_text(ci.replace(pin, "actions/checkout@main"))
    result = zizmor(tmp_path)
    assert result.returncode != 0 and "unpinned-uses" in result.stdout, result.stdout + result.stderr

    (tmp_path / ".github" / "dependabot.yml").write_text("version: 2\nupdates:\n  - package-ecosystem: pip\n")
    broken.write_text(ci)
    result = zizmor(tmp_path)
    assert result.returncode != 0 and "does not match expected validation schema" in result.stderr, result.stderr


def test_every_action_is_pinned_by_commit_with_its_version_in_a_comment() -> None:
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*(?:-\s+)?uses:", line):
                assert PINNED.match(line), f"{path.name}:{number}: not `uses: owner/action@<commit> # vX.Y.Z`: {line}"
    # one commit per action across the workflows, so an update changes them all
    pins: dict[str, set[str]] = {}
    for path in WORKFLOWS.glob("*.yml"):
        for action, commit in re.findall(r"uses:\s+([\w./-]+)@([0-9a-f]{40})", path.read_text()):
            pins.setdefault(action, set()).add(commit)
    assert pins and all(len(commits) == 1 for commits in pins.values()), pins


# ─── what each workflow does ─────────────────────────────────────────────────────────────────────


def supported_pythons() -> list[str]:
    return [c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)]


def test_ci_runs_the_readme_s_test_command_on_every_supported_python_and_the_container_tier_once() -> None:
    ci = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    jobs = ci["jobs"]
    assert supported_pythons() == ["3.11", "3.12", "3.13"]
    for name, command in (("unit", "pytest -m unit"), ("test", "./scripts/test")):
        assert jobs[name]["strategy"]["matrix"]["python"] == supported_pythons(), name
        assert command in runs(jobs[name]), name
        assert "actions/setup-python" in uses(jobs[name])
    assert "./scripts/test" in (REPO / "README.md").read_text()
    assert '-m "not container"' in runs(jobs["test"]), "the container tier runs once, in its own job"
    assert "strategy" not in jobs["container"] and ".ci/run -m container" in runs(jobs["container"])
    assert '"$@"' in (REPO / ".ci" / "run").read_text(), ".ci/run hands its arguments to pytest"
    assert ci["permissions"] == {} and all(job["permissions"] == {"contents": "read"} for job in jobs.values())


def test_docs_workflow_builds_the_site_strictly_and_deploys_it_to_pages() -> None:
    docs = workflow("docs.yml")
    assert "mkdocs build --strict" in runs(docs["jobs"]["build"])
    assert "actions/upload-pages-artifact" in uses(docs["jobs"]["build"])
    deploy = docs["jobs"]["deploy"]
    assert uses(deploy) == ["actions/deploy-pages"] and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}


def test_the_image_workflow_builds_it_and_the_release_workflow_ships_everything_on_a_version_tag() -> None:
    image = workflow("image.yml")
    assert "docker build -f docker/Dockerfile" in runs(image["jobs"]["build"])
    assert "docker push" not in runs(image["jobs"]["build"]), "only a release pushes"

    release = workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*"]}}
    [job] = release["jobs"].values()
    script = runs(job)
    for step in (
        "scripts/release.py build",
        "scripts/release.py sbom dist/*.whl",
        "scripts/release.py image-sbom",
        "docker build -f docker/Dockerfile --build-arg",
        "docker push",
        "gh release create",
        "archiver/__init__.py",
    ):
        assert step in script, f"the release workflow does not run {step}"
    assert job["permissions"] == {"contents": "write", "packages": "write"}


def test_the_release_notes_are_the_changelog_s_section(tmp_path: Path) -> None:
    """The awk line of the release workflow, run on the changelog: the version's section, whole."""
    [awk] = [line.strip() for line in runs(workflow("release.yml")["jobs"]["release"]).splitlines() if "awk " in line]
    from archiver import __version__

    out = subprocess.run(
        ["bash", "-c", awk.replace("> notes.md", "")],
        cwd=REPO,
        env={"VERSION": __version__, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    changelog = (REPO / "CHANGELOG.md").read_text()
    section = changelog.split(f"## [{__version__}]", 1)[1].split("\n## [", 1)[0].split("\n", 1)[1]
    assert out.strip() and out.strip() == section.strip()


# ─── dependabot, pre-commit ──────────────────────────────────────────────────────────────────────


def test_dependabot_updates_python_packages_actions_and_the_image_base() -> None:
    config = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    assert config["version"] == 2
    updates = {u["package-ecosystem"]: u for u in config["updates"]}
    assert set(updates) == {"pip", "github-actions", "docker"}
    assert updates["pip"]["directory"] == "/" and (REPO / "pyproject.toml").exists()
    assert updates["github-actions"]["directory"] == "/"
    assert (REPO / updates["docker"]["directory"].strip("/") / "Dockerfile").exists()


def test_pre_commit_runs_ruff_ruff_format_and_the_unit_tier_with_the_suite_s_own_tools(tmp_path: Path) -> None:
    result = subprocess.run(
        [tool("pre-commit"), "validate-config", ".pre-commit-config.yaml"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PRE_COMMIT_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert hooks["ruff-check"]["entry"].startswith(".venv/bin/ruff check")
    assert hooks["ruff-format"]["entry"].startswith(".venv/bin/ruff format")
    assert "pytest -m unit" in hooks["pytest-unit"]["entry"] and hooks["pytest-unit"]["pass_filenames"] is False
    scripts_test = (REPO / "scripts" / "test").read_text()
    assert "ruff check" in scripts_test and "ruff format" in scripts_test and "-m venv .venv" in scripts_test


@pytest.mark.skipif(shutil.which("git") is None, reason="asks git itself; the unit tier may run where git is not")
def test_what_the_tools_make_is_ignored_by_git() -> None:
    """The built site (mkdocs' site/), the release's build/ and dist/, the virtual environment,
    desto's default archive folder and the benchmark's own runs never show as files to commit."""
    mkdocs = (REPO / "mkdocs.yml").read_text()
    site = re.search(r"^site_dir:\s*(\S+)", mkdocs, re.MULTILINE)
    made = [
        f"{site.group(1).strip('/') if site else 'site'}/index.html",
        "build/lib/archiver/__init__.py",
        "dist/desto_archiver-0.0.0-py3-none-any.whl",
        ".venv/bin/python",
        "desto_data/desto.db",
        "bench/runs/run.json",
    ]
    for path in made:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, timeout=30)
        assert result.returncode == 0, f"git does not ignore {path}: add its folder to .gitignore"


# ─── the package metadata ────────────────────────────────────────────────────────────────────────


def test_the_version_is_written_once_and_the_changelog_releases_it() -> None:
    from archiver import __version__

    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "archiver.__version__"}
    changelog = (REPO / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", changelog, re.MULTILINE)
    assert releases[0] == ("Unreleased", ""), "the changelog's first section is Unreleased"
    assert releases[1][0] == __version__, f"the newest release in CHANGELOG.md is {releases[1][0]}, not {__version__}"
    assert releases[1][1], "the release has a date"


def test_the_metadata_an_index_page_shows() -> None:
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"], "SPDX license expressions need setuptools 77"
    assert PROJECT["keywords"] and "desto" in PROJECT["keywords"]
    assert PROJECT["urls"]["desto"] == "https://github.com/kalfasyan/desto"
    assert PROJECT["urls"]["Source"] == "https://github.com/OWNER/desto-archiver"
    minimum = re.fullmatch(r">=(3\.\d+)", PROJECT["requires-python"]).group(1)  # type: ignore[union-attr]
    assert supported_pythons()[0] == minimum, "the classifiers begin at requires-python's version"
    assert "License ::" not in " ".join(PROJECT["classifiers"]), "the licence is the SPDX expression alone"


# ─── the guides and the issue templates ──────────────────────────────────────────────────────────


def local_links(path: Path) -> list[str]:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text())
    return [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("name", ["CONTRIBUTING.md", "SECURITY.md", "README.md"])
def test_the_guides_links_resolve(name: str) -> None:
    for link in local_links(REPO / name):
        assert (REPO / link).exists(), f"{name} links to {link}, which does not exist"


def test_contributing_says_how_to_test_add_a_kind_keep_a_benchmark_and_release() -> None:
    text = (REPO / "CONTRIBUTING.md").read_text()
    readme = (REPO / "README.md").read_text()
    for command in (
        "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/desto-archiver run",
        "./scripts/test",
    ):
        assert command in text and command in readme, command
    for tier in ("pytest -m unit", "pytest -m slow", "pytest -m container", "integration"):
        assert tier in text, tier
    for marker in re.findall(r'^    "(\w+):', (REPO / "pyproject.toml").read_text(), re.MULTILINE):
        assert marker in text, f"the pytest marker {marker} is not among CONTRIBUTING.md's tiers"
    for step in ("archiver/kinds.py", "archiver/models.py", "archiver/archive/schema.py", "SCHEMA_VERSION"):
        assert step in text, step
    for step in ("python -m bench", "python -m bench.keep", "bench/results/", "scripts/bench_tables.py"):
        assert step in text, step
    for step in ("archiver/__init__.py", "ARG VERSION", "git tag v", "release.yml", "scripts/release.py build"):
        assert step in text, step
    assert "OWNER" in text and "SECURITY.md" in text
    assert "## Contributing" in readme and "(CONTRIBUTING.md)" in readme and "(SECURITY.md)" in readme


def test_security_says_what_the_archive_holds_how_to_report_and_what_is_in_scope() -> None:
    text = (REPO / "SECURITY.md").read_text()
    sections = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert sections == [
        "What the archive holds",
        "Reporting a problem",
        "What is in scope",
        "Threat model",
        "The guarantees",
    ]
    scope = text.split("## What is in scope", 1)[1].split("\n## ", 1)[0]
    for subject in ("Secrets in command lines and outputs", "The file's permissions", "The central database's roles",
                    "Hostile values written into Redis"):  # fmt: skip
        assert f"**{subject}**" in scope, subject
    threats = text.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    for who in (
        "Who writes Redis.",
        "Who reads the archive.",
        "Who writes the archive's folder.",
        "The central database.",
    ):
        assert f"**{who}**" in threats, who
    guarantees = text.split("## The guarantees", 1)[1]
    assert "makes these" in guarantees and "does not make these" in guarantees
    assert "privately" in text and "Report a vulnerability" in text


def test_the_issue_templates_and_security_reports_go_elsewhere() -> None:
    templates = REPO / ".github" / "ISSUE_TEMPLATE"
    config = yaml.safe_load((templates / "config.yml").read_text())
    assert config["blank_issues_enabled"] is False
    [security] = [link for link in config["contact_links"] if link["url"].endswith("/SECURITY.md")]
    assert security["url"] == PROJECT["urls"]["Source"] + "/blob/main/SECURITY.md"
    for name in ("bug.yml", "feature.yml"):
        form = yaml.safe_load((templates / name).read_text())
        assert form["name"] and form["description"] and form["body"], name
        ids = [field["id"] for field in form["body"] if "id" in field]
        assert len(ids) == len(set(ids)) and any(f.get("validations", {}).get("required") for f in form["body"])
    bug = (templates / "bug.yml").read_text()
    assert "desto-archiver --version" in bug and "SECURITY.md" in bug
