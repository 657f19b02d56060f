"""A release as a user gets it: the wheel and the sdist built from the project's own files and
checked, the wheel installed alone into a fresh virtual environment and run from outside any
source tree, and its bill of materials; the version written once and the changelog cut for it.

The fresh environment installs the wheel's dependencies from the package index pip is set up
with: where none answers, those tests are skipped with the reason."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from archiver import __version__
from tests.helpers import REPO, count, project_files, script, session_hash

release = script("release")


# ─── built ───────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel and the sdist, built from a copy of the project's files (nothing else of the
    working tree goes in), with this environment's setuptools, and checked by twine and
    check-wheel-contents."""
    copy = tmp_path_factory.mktemp("source") / "desto-archiver"
    for name in project_files():
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    out = tmp_path_factory.mktemp("dist")
    wheel, sdist = release.build(out, source=copy, isolated=False)
    print(f"\nwheel {wheel.stat().st_size:,} bytes, sdist {sdist.stat().st_size:,} bytes")
    return wheel, sdist


def test_the_wheel_holds_the_package_its_licence_and_its_metadata(dist: tuple[Path, Path]) -> None:
    wheel, _ = dist
    assert wheel.name == f"desto_archiver-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"desto_archiver-{__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        assert zf.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert {n.split("/")[0] for n in names} == {"archiver", info}
    packaged = {n.removeprefix("archiver/") for n in names if n.startswith("archiver/")}
    assert packaged == {p.relative_to(REPO / "archiver").as_posix() for p in (REPO / "archiver").rglob("*.py")}
    headers = dict(line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line)
    assert headers["Version"] == __version__ and headers["License-Expression"] == "MIT"
    assert "Project-URL: desto, https://github.com/kalfasyan/desto" in metadata
    assert "desto-archiver = archiver.commands.cli:main" in entry_points


def test_the_sdist_is_the_whole_project(dist: tuple[Path, Path]) -> None:
    _, sdist = dist
    top = f"desto_archiver-{__version__}/"
    with tarfile.open(sdist) as tf:
        names = {m.name.removeprefix(top) for m in tf.getmembers() if m.isfile()}
    missing = sorted(n for n in project_files() if (REPO / n).is_file() and n not in names)
    assert not missing, f"tracked but not in the sdist: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_a_broken_readme_fails_the_build_s_checks(tmp_path: Path) -> None:
    """twine check is no formality: a long description an index cannot render fails the build."""
    copy = tmp_path / "src"
    for name in [
        "pyproject.toml",
        "LICENSE",
        "MANIFEST.in",
        *(n for n in project_files() if n.startswith("archiver/")),
    ]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    (copy / "README.md").write_text("# desto-archiver\n")
    pyproject = (copy / "pyproject.toml").read_text().replace('readme = "README.md"', 'readme = "README.rst"')
    (copy / "pyproject.toml").write_text(pyproject)
    (copy / "README.rst").write_text("desto-archiver\n====\n\n.. unknown-directive::\n")
    with pytest.raises(release.ReleaseError, match="twine"):
        release.build(tmp_path / "dist", source=copy, isolated=False)


# ─── installed alone ─────────────────────────────────────────────────────────────────────────────


@functools.cache
def index_unreachable() -> str | None:
    """Why the package index cannot serve the wheel's dependencies here; None when it can."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp,
             "structlog"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PIP_NO_INPUT": "1", "PIP_TIMEOUT": "15", "PIP_RETRIES": "1"},
        )  # fmt: skip
    return None if probe.returncode == 0 else "the package index does not answer: " + probe.stderr.strip()[-200:]


@pytest.fixture(scope="module")
def installed(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel alone; returns its bin folder."""
    reason = index_unreachable()
    if reason:
        pytest.skip(reason)
    python = release.fresh_environment(dist[0], tmp_path_factory.mktemp("fresh") / "venv")
    return python.parent


def outside(tmp_path: Path) -> dict[str, str]:
    """An environment with nothing of the source tree or of the test's own virtual environment."""
    drop = ("PYTHON", "VIRTUAL_ENV", "REDIS_", "SQLITE_", "ARCHIVER_", "DESTO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = "/usr/bin:/bin"
    env["HOME"] = str(tmp_path)
    return env


def test_the_installed_wheel_runs_from_outside_any_source_tree(
    installed: Path, tmp_path: Path, redis_server, redis
) -> None:
    exe = str(installed / "desto-archiver")
    env = outside(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    where = subprocess.run(
        [str(installed / "python"), "-c", "import archiver; print(archiver.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(installed.parent)) and not where.startswith(str(REPO)), where

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"desto-archiver {__version__}"
    usage = run("--help")
    assert usage.returncode == 0 and "backfill" in usage.stdout and "Example" in usage.stdout

    record = session_hash(session_name="from-the-wheel")
    redis.hset(f"desto:session:{record['session_id']}", mapping=record)
    (tmp_path / "desto_data").mkdir()
    db = tmp_path / "desto_data" / "desto.db"
    backfill = run("backfill", "--redis-url", redis_server.url, "--db", str(db), "--json")
    assert backfill.returncode == 0, backfill.stderr
    assert json.loads(backfill.stdout)["written"] == {"session": 1}
    assert count(db, "sessions", "session_name = ?", ("from-the-wheel",)) == 1


def test_the_wheel_s_bill_of_materials(dist: tuple[Path, Path], installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "sbom.cdx.json"
    document = release.environment_sbom(installed / "python", out)
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"]
    # names as the index normalizes them (PEP 503): distributions spell them either way
    components = {re.sub(r"[-_.]+", "-", c["name"].lower()): c for c in document["components"]}  # type: ignore[union-attr]
    ours = components["desto-archiver"]
    assert ours["version"] == __version__
    assert [lic["license"]["id"] for lic in ours["licenses"]] == ["MIT"]
    # the component is the very wheel that was built: its archive's hash
    [archive] = [ref for ref in ours["externalReferences"] if ref["type"] == "distribution"]
    assert archive["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(dist[0].read_bytes()).hexdigest()}]
    for dependency in ("redis", "hiredis", "structlog", "prometheus-client"):
        assert re.sub(r"[-_.]+", "-", components[dependency]["purl"].lower()).startswith(f"pkg:pypi/{dependency}@")
    assert "pytest" not in components, "the test tools are not in the wheel's environment"
