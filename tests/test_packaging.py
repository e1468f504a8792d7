"""What `pip install customfit` gives: the source distribution and the wheel
built from it, as a release builds them, and the README as the package
index shows it (the long description, where relative links are dead).

The builds run on a copy of the checkout, with the installed setuptools and
no network (`--no-build-isolation`), so the shared tree is not written to.
"""

import email.parser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import customfit
from tests.subproc import ROOT

SITE = "https://customfit.github.io/customfit/"
SOURCE = "https://github.com/customfit/customfit"
INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
AUTOLINK = re.compile(r"<([a-z]+:[^>\s]+)>")

# What the source distribution carries besides the package (MANIFEST.in):
# the files named here, and every file of these folders.
SDIST_FILES = ("README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "setup.cfg")
SDIST_FOLDERS = ("tests", "examples", "docs", "notebooks")
# Development tools that need a clone.
NOT_IN_SDIST = ("benchmarks", "conformance", ".ci", "noxfile.py", "mkdocs.yml")
# Left out of the copy the builds run on: what .gitignore ignores.
NOT_SOURCE = (".git", "build", "dist", "site", "runs", ".nox", "*.egg-info", "__pycache__",
              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".whl", ".build", "*.pyc")


def readme_links():
    text = (ROOT / "README.md").read_text()
    # Code (fenced or inline) holds no links.
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"`[^`]*`", "``", prose)
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, AUTOLINK)
            for m in pattern.finditer(prose)]


def site_page(url):
    """The file under docs/ that mkdocs (use_directory_urls, the default)
    serves at `url`, a URL of the documentation site."""
    path = url[len(SITE):].split("#")[0]
    assert path == "" or path.endswith("/"), f"{url}: a site page's URL ends with /"
    path = path.rstrip("/")
    candidates = [ROOT / "docs" / f"{path}.md", ROOT / "docs" / path / "index.md"]
    return next((c for c in candidates if c.is_file()), None)


def test_every_readme_link_is_absolute_and_names_a_page_or_file_that_exists():
    links = readme_links()
    assert len(links) >= 20
    for link in links:
        assert re.match(r"https?://", link), f"README.md: {link} is not absolute"
        if link.startswith(SITE):
            assert site_page(link) is not None, f"README.md: no page in docs/ for {link}"
        elif link.startswith(f"{SOURCE}/blob/main/"):
            path = link[len(f"{SOURCE}/blob/main/"):].split("#")[0]
            assert (ROOT / path).is_file(), f"README.md: {link} names no file"
    assert f"{SOURCE}/blob/main/LICENSE" in links
    assert f"{SITE}changelog/" in links


def test_site_pages_map_back_to_their_files():
    assert site_page(SITE) == ROOT / "docs" / "index.md"
    assert site_page(f"{SITE}guides/hooks/") == ROOT / "docs" / "guides" / "hooks.md"
    assert site_page(f"{SITE}recipes/") == ROOT / "docs" / "recipes" / "index.md"
    assert site_page(f"{SITE}guides/no-such-page/") is None


def test_the_license_is_apache_2_with_its_copyright_line():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The customfit authors\n")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist built from a copy of the checkout, and the wheel built from
    that sdist."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    run([sys.executable, "-c", "import setuptools.build_meta as b; "
         f"b.build_sdist({str(tmp / 'dist')!r})"], cwd=source)
    (sdist,) = (tmp / "dist").glob("customfit-*.tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp / "wheel"), str(sdist)], cwd=tmp)
    (wheel,) = (tmp / "wheel").glob("customfit-*.whl")
    return tmp, sdist, wheel


def run(command, cwd):
    process = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, f"{command} failed:\n{process.stdout}\n{process.stderr}"
    return process.stdout


@pytest.mark.slow
def test_the_wheel_carries_the_package_the_license_and_the_metadata(built):
    _, _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"customfit-{customfit.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(
            archive.read(f"{dist_info}/METADATA").decode())
        licenses = [n for n in names if n in (f"{dist_info}/LICENSE",
                                              f"{dist_info}/licenses/LICENSE")]
        assert len(licenses) == 1, names
        assert archive.read(licenses[0]).decode() == (ROOT / "LICENSE").read_text()
    assert {n.split("/")[0] for n in names} == {"customfit", dist_info}
    assert "customfit/py.typed" in names
    assert "Apache-2.0" in (metadata["License"], metadata["License-Expression"])
    assert metadata["Author"] == "The customfit authors"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert dict(u.split(", ", 1) for u in metadata.get_all("Project-URL")) == {
        "Homepage": SITE, "Documentation": SITE, "Source": SOURCE,
        "Changelog": f"{SITE}changelog/", "Issues": f"{SOURCE}/issues"}
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (ROOT / "README.md").read_text().strip()


@pytest.mark.slow
def test_the_sdist_carries_the_tests_and_their_files_and_no_development_tools(built):
    _, sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {*SDIST_FILES, *(str(p.relative_to(ROOT)) for p in (ROOT / "customfit").rglob("*")
                                if p.is_file() and p.suffix in (".py", ".typed"))}
    for folder in SDIST_FOLDERS:
        expected |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
                     if p.is_file() and not p.match("*.pyc") and "__pycache__" not in p.parts}
    assert expected - names == set()
    for left_out in NOT_IN_SDIST:
        assert not [n for n in names if n == left_out or n.startswith(f"{left_out}/")], left_out
    assert not [n for n in names if n.endswith(".pyc")]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pip_installs_the_sdist(built, tmp_path):
    _, sdist, _ = built
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--quiet", "--target", str(target), str(sdist)], cwd=tmp_path)
    out = run([sys.executable, "-c", "import customfit; print(customfit.__version__); "
               "print(customfit.__file__)"], cwd=target)
    version, location = out.split()
    assert version == customfit.__version__
    assert Path(location).is_relative_to(target)
