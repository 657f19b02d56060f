"""The release's artifacts, made the same way by the release workflow and by the test suite.

    python scripts/release.py build [--outdir dist]          the wheel and the sdist, checked
    python scripts/release.py sbom WHEEL [--output FILE]     CycloneDX of the wheel's environment
    python scripts/release.py image-sbom IMAGE [--output FILE]   CycloneDX of the image's Python packages

``build`` runs ``python -m build`` then ``twine check --strict`` and ``check-wheel-contents`` on
what it built; ``sbom`` installs the wheel alone into a fresh virtual environment (outside any
source tree), checks that its ``desto-archiver --version`` answers, and describes that
environment with ``cyclonedx-py environment``; ``image-sbom`` lists the image's Python
distributions (``pip list`` inside it) and describes them with ``cyclonedx-py requirements``.
The tools come with the ``test`` extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the tools are installed beside the interpreter running this


class ReleaseError(Exception):
    """A step failed; the message holds what the tool said."""


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ReleaseError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    return result.stdout


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise ReleaseError(f"{path} is missing: install the test extra (pip install -e '.[test]')")
    return str(path)


def build(outdir: Path, source: Path = REPO, isolated: bool = True) -> tuple[Path, Path]:
    """The wheel and the sdist of ``source`` in ``outdir``, each checked; returns (wheel, sdist)."""
    outdir.mkdir(parents=True, exist_ok=True)
    before = set(outdir.iterdir())
    _run(
        [sys.executable, "-m", "build", *([] if isolated else ["--no-isolation"]), "--outdir", str(outdir), str(source)]
    )
    made = set(outdir.iterdir()) - before
    wheels = [p for p in made if p.suffix == ".whl"]
    sdists = [p for p in made if p.name.endswith(".tar.gz")]
    if len(wheels) != 1 or len(sdists) != 1:
        raise ReleaseError(f"expected one wheel and one sdist, built {sorted(p.name for p in made)}")
    _run([_tool("twine"), "check", "--strict", str(wheels[0]), str(sdists[0])])
    _run([_tool("check-wheel-contents"), str(wheels[0])])
    return wheels[0], sdists[0]


def fresh_environment(wheel: Path, directory: Path) -> Path:
    """A new virtual environment in ``directory`` with the wheel (and its dependencies) alone
    installed; returns its interpreter. Nothing runs from a source tree: the working directory is
    the environment's own."""
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    python = directory / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], cwd=directory)
    return python


def environment_sbom(python: Path, output: Path) -> dict[str, object]:
    """CycloneDX (JSON) of the environment ``python`` belongs to, written to ``output``."""
    _run(
        [
            _tool("cyclonedx-py"),
            "environment",
            "--output-reproducible",
            "--output-format",
            "JSON",
            "--output-file",
            str(output),
            str(python),
        ]
    )
    document: dict[str, object] = json.loads(output.read_text())
    return document


def wheel_sbom(wheel: Path, output: Path) -> dict[str, object]:
    """The wheel installed alone into a fresh virtual environment, run once, and described."""
    with tempfile.TemporaryDirectory(prefix="desto-archiver-sbom-") as tmp:
        python = fresh_environment(wheel, Path(tmp) / "venv")
        version = _run([str(python.parent / "desto-archiver"), "--version"], cwd=Path(tmp)).strip()
        print(version, file=sys.stderr)
        return environment_sbom(python, output)


def image_sbom(image: str, output: Path) -> dict[str, object]:
    """CycloneDX (JSON) of the Python distributions installed in ``image``."""
    # name==version for each (pip freeze would give the wheel the image installed as a file: URL)
    frozen = _run(["docker", "run", "--rm", "--entrypoint", "pip", image, "list", "--format=freeze"])
    with tempfile.TemporaryDirectory(prefix="desto-archiver-sbom-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(frozen)
        _run(
            [
                _tool("cyclonedx-py"),
                "requirements",
                "--output-reproducible",
                "--output-format",
                "JSON",
                "--output-file",
                str(output),
                str(requirements),
            ]
        )
    document: dict[str, object] = json.loads(output.read_text())
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/release.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("build", help="the wheel and the sdist, checked with twine and check-wheel-contents")
    p.add_argument("--outdir", type=Path, default=REPO / "dist")
    p.add_argument("--no-isolation", action="store_true", help="build with this environment's setuptools")
    p = sub.add_parser("sbom", help="CycloneDX of a fresh environment holding the wheel alone")
    p.add_argument("wheel", type=Path)
    p.add_argument("--output", type=Path, default=None, help="default: beside the wheel, .cdx.json")
    p = sub.add_parser("image-sbom", help="CycloneDX of the image's Python distributions")
    p.add_argument("image")
    p.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.step == "build":
            for path in build(args.outdir, isolated=not args.no_isolation):
                print(path)
        elif args.step == "sbom":
            output = args.output or args.wheel.with_name(args.wheel.name.removesuffix(".whl") + ".cdx.json")
            wheel_sbom(args.wheel.resolve(), output)
            print(output)
        else:
            image_sbom(args.image, args.output)
            print(args.output)
    except ReleaseError as exc:
        print(f"scripts/release.py {args.step}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
