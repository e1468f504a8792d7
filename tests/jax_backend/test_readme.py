"""The README's JAX example runs as written on JAX (the main suite runs the
whole README on TensorFlow, tests/test_docs.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_readme_jax_example_runs_on_jax(tmp_path):
    section = ROOT.joinpath("README.md").read_text().split("\n## JAX\n")[1].split("\n## ")[0]
    code = re.search(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("jax [")
