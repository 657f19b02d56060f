"""The image as the release workflow ships it: its OCI labels and its bill of materials (the
container tier: skipped with the reason where no container engine answers)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from archiver import __version__
from tests.container_helpers import Image, docker
from tests.helpers import REPO, script

pytestmark = pytest.mark.container

release = script("release")


def test_the_image_s_labels_name_its_version_licence_and_source(archiver_image: Image) -> None:
    labels = json.loads(docker("inspect", "-f", "{{json .Config.Labels}}", archiver_image.name).stdout)
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"] == urls["Source"]
    version = docker("run", "--rm", archiver_image.name, "--version").stdout.strip()
    assert version == f"desto-archiver {__version__}"


def test_the_image_s_bill_of_materials(archiver_image: Image, tmp_path: Path) -> None:
    document = release.image_sbom(archiver_image.name, tmp_path / "image.cdx.json")
    assert document["bomFormat"] == "CycloneDX"
    components = {re.sub(r"[-_.]+", "-", c["name"].lower()): c for c in document["components"]}
    assert components["desto-archiver"]["version"] == __version__
    for dependency in ("redis", "hiredis", "structlog", "prometheus-client", "pip"):
        assert dependency in components, f"{dependency} is not in the image's bill of materials"
    assert "pytest" not in components and "build" not in components
