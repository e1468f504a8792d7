"""Every Python block of the README and of docs/ runs as written.

A page's blocks run in order as one module, in a fresh process whose working
directory is empty (files a block writes, such as `runs/tb`, land there).
Pages whose examples need data or a model start with a block that makes them,
visible to the reader. A block that defines pytest-style `test_*` functions
(the testing guide) has them called afterwards, with op determinism on, as
the `customfit_deterministic` fixture would.
"""

import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest

from tests.subproc import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

RUN_TESTS = """
import importlib, inspect, sys
sys.path.insert(0, sys.argv[1])
module = importlib.import_module("page_code")
tests = [(name, f) for name, f in vars(module).items()
         if name.startswith("test_") and inspect.isfunction(f)]
if tests:
    import keras, tensorflow as tf
    tf.config.experimental.enable_op_determinism()
for name, test in tests:
    keras.utils.set_random_seed(0)
    parameters = inspect.signature(test).parameters
    test(**{p: 0 for p in parameters if p == "customfit_deterministic"})
    print("passed", name)
"""


def python_blocks(page):
    """The page's Python blocks, but those that only include a file of the
    package (`--8<-- "customfit/..."`): that code is tested where it lives."""
    blocks = [textwrap.dedent(block) for block in BLOCK.findall(page.read_text())]
    return [b for b in blocks if not all(line.startswith("--8<--") for line in b.split("\n") if line)]


def test_every_page_with_python_is_collected():
    with_code = [p for p in PAGES if python_blocks(p)]
    assert ROOT / "README.md" in with_code
    assert len(with_code) >= 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)],
    ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path):
    code = "\n\n".join(python_blocks(page))
    (tmp_path / "page_code.py").write_text(code)
    process = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning:customfit",
         "-c", RUN_TESTS, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3",
             "PYTHONPATH": str(ROOT)},
    )
    assert process.returncode == 0, (
        f"{page.relative_to(ROOT)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}")


def test_ci_runs_the_test_command_the_docs_give():
    """`.ci/run`, the README and Getting started give one test command."""
    if not (ROOT / ".ci").exists() and not (ROOT / ".git").exists():
        pytest.skip("a source distribution: .ci/ is not in it (MANIFEST.in)")
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m pip install -e")
    for page in (ROOT / "README.md", ROOT / "docs" / "getting-started.md"):
        assert f"```bash\n{command}\n```" in page.read_text(), page.name


def test_every_example_of_the_readme_and_getting_started_has_its_install_line():
    """`nox -s readme` runs each of them in the environment its install
    line makes; it reads them as `examples` reads them."""
    if not (ROOT / "noxfile.py").exists():
        pytest.skip("a source distribution: noxfile.py is not in it (MANIFEST.in)")
    spec = importlib.util.spec_from_file_location("noxfile", ROOT / "noxfile.py")
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    for page in noxfile.EXAMPLE_PAGES:
        examples = noxfile.examples(page)  # raises for a block without one
        assert len({e.where for e in examples if e.code}) == len(python_blocks(ROOT / page)), page
    readme = noxfile.examples("README.md")
    # One example on every backend: in the main environment (TensorFlow,
    # tests/test_docs.py) and in one made for JAX and one for PyTorch.
    other_backends = {e.env.get("KERAS_BACKEND"): e.code for e in readme}
    assert other_backends["jax"] == other_backends["torch"]
    assert any(e.command.startswith("python3 examples/") for e in readme)
