"""What gets published: the built sdist and wheel, their metadata, and the README that the package index shows."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.version import Version

import stockpyle

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DOCS_URL = PYPROJECT["project"]["urls"]["Documentation"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def wheel_metadata(wheel: Path) -> tuple[list[str], object]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        return names, Parser().parsestr(archive.read(metadata).decode("utf-8"))


def test_the_version_is_above_the_2016_release() -> None:
    assert Version(stockpyle.__version__) > Version("0.1.8")
    assert Version(stockpyle.__version__) >= Version("1.0.0rc1")


def test_the_sdist_has_what_the_readme_points_to(built: dict[str, Path]) -> None:
    version = stockpyle.__version__
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "examples/quickstart.py",
        "examples/prometheus_export.py",
        "scripts/demo",
        "scripts/test",
        "scripts/_setup.sh",
        "benchmarks/_timing.py",
        "docs/conf.py",
        "tests/conftest.py",
        "README.rst",
        "LICENSE",
    ):
        assert needed in names, needed
    assert not any(name.startswith(("docs/_build", ".venv")) for name in names)
    assert built["sdist"].name == f"stockpyle-{version}.tar.gz"  # the name `stockpyle bench` tells users to unpack


def test_the_wheel_holds_the_package_and_honest_metadata(built: dict[str, Path]) -> None:
    names, metadata = wheel_metadata(built["wheel"])
    assert {name.split("/")[0] for name in names} == {"stockpyle", f"stockpyle-{stockpyle.__version__}.dist-info"}
    assert metadata["Version"] == stockpyle.__version__  # type: ignore[index]
    urls = metadata.get_all("Project-URL")  # type: ignore[attr-defined]
    assert f"Documentation, {DOCS_URL}" in urls
    assert any(url.startswith("Changelog, ") for url in urls)
    classifiers = set(metadata.get_all("Classifier"))  # type: ignore[attr-defined]
    for minor in range(10, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert metadata["Requires-Python"] == ">=3.10"  # type: ignore[index]
    # development requirements are dependency groups, not published extras
    extras = set(metadata.get_all("Provides-Extra"))  # type: ignore[attr-defined]
    assert extras == {
        "all", "bench", "cli", "memcache", "postgres", "pylibmc", "redis", "redis-asyncio", "shove", "sqlalchemy",
        "sqlalchemy-asyncio",
    }  # fmt: skip
    assert not any("pytest" in requirement for requirement in metadata.get_all("Requires-Dist"))  # type: ignore[attr-defined]


def test_development_requirements_are_dependency_groups() -> None:
    groups = PYPROJECT["dependency-groups"]
    assert {"test", "lint", "typing", "docs", "dev"} <= set(groups)
    assert any(requirement.startswith("pytest") for requirement in groups["test"])
    assert {"include-group": "test"} in groups["dev"]
    assert "test" not in PYPROJECT["project"]["optional-dependencies"]
    # pip gained --group in 25.1: the scripts make sure the environment has it
    assert 'STOCKPYLE_MIN_PIP="25.1"' in (ROOT / "scripts" / "_setup.sh").read_text(encoding="utf-8")


def readme_links() -> list[str]:
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    return re.findall(r"`[^`<]*<([^>]+)>`__?", text)


def test_readme_links_work_without_the_repository() -> None:
    # the package index renders README.rst on its own: relative links would be dead there
    links = readme_links()
    assert links
    for link in links:
        assert link.startswith("https://"), link


def test_readme_links_into_the_docs_name_existing_pages() -> None:
    assert DOCS_URL.endswith("/en/stable/")
    changelog = PYPROJECT["project"]["urls"]["Changelog"]
    for link in [*readme_links(), changelog]:
        if not link.startswith(DOCS_URL):
            continue
        page = link[len(DOCS_URL) :].split("#", 1)[0]
        assert page.endswith(".html"), link
        assert (ROOT / "docs" / page.replace(".html", ".rst")).is_file(), link


def test_every_store_page_has_a_runnable_example() -> None:
    pages = sorted((ROOT / "docs" / "stores").glob("*.rst"))
    assert len(pages) >= 5
    for page in pages:
        if page.name != "index.rst":
            assert "\n>>> " in page.read_text(encoding="utf-8") or "   >>> " in page.read_text(encoding="utf-8"), page
