"""pytest configuration for Keras' rewritten tests: Keras' markers, and a
record of every test's outcome (and every skip's reason) for
`conformance/run.py` to compare.

Without TensorFlow installed (the JAX run), a test that fails because its
own code, or Keras' code, imports TensorFlow is skipped instead, with the
reason "needs TensorFlow, which is not installed" and the line that asked
for it; so is one that fails with Keras' error for a remote path (Keras reads
and writes those with TensorFlow's gfile). An import of TensorFlow from
customfit's code is not: that fails the test, as customfit must not need
TensorFlow on another backend.
"""

import importlib.util
import json
import os
from pathlib import Path

import keras
import pytest
from keras.src.utils import file_utils, module_utils

import conformance_base

_OUTCOMES: dict[str, str] = {}
_SKIP_REASONS: dict[str, str] = {}

TENSORFLOW_INSTALLED = importlib.util.find_spec("tensorflow") is not None
NEEDS_TENSORFLOW = "needs TensorFlow, which is not installed"
# Frames between the code that asked for TensorFlow and the ImportError.
_IMPORT_MACHINERY = ("<frozen importlib", str(Path(importlib.__file__).parent),
                     str(Path(module_utils.__file__)),
                     str(Path(conformance_base.__file__)))
_CUSTOMFIT = str(Path(importlib.util.find_spec("customfit").origin).parent)


def _asked_for_missing_tensorflow(excinfo):
    """Where a missing TensorFlow was asked for ("path:line"), when
    `excinfo` is the error of that (an ImportError of it, also as Keras
    rewords one, or Keras' own error for a remote path, which it handles with
    TensorFlow's gfile) and not customfit's code asked; else None."""
    if TENSORFLOW_INSTALLED:
        return None
    error = excinfo.value
    if isinstance(error, ImportError):
        if not ((error.name or "").split(".")[0] == "tensorflow"
                or "No module named 'tensorflow" in str(error)
                or "requires the tensorflow module" in str(error)):
            return None
    elif not (isinstance(error, ValueError) and excinfo.traceback
              and excinfo.traceback[-1].name == "_raise_if_no_gfile"
              and str(excinfo.traceback[-1].path) == file_utils.__file__):
        return None
    for entry in reversed(excinfo.traceback[:-1] if isinstance(error, ValueError)
                          else excinfo.traceback):
        path = str(entry.path)
        if path.startswith(_IMPORT_MACHINERY):
            continue
        if path.startswith(_CUSTOMFIT):
            return None
        return f"{_short(path)}:{entry.lineno + 1}"
    return None


def _short(path):
    for root in (str(Path(keras.__file__).parent.parent), os.getcwd()):
        if path.startswith(root + os.sep):
            return path[len(root) + 1:]
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None:
        where = _asked_for_missing_tensorflow(call.excinfo)
        if where:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] + 1,
                               f"Skipped: {NEEDS_TENSORFLOW} ({where})")
    return report


def skip_if_backend(backend, reason):
    """Keras' own conftest helper, which some test files import."""
    import keras

    return pytest.mark.skipif(keras.backend.backend() == backend, reason=reason)


def pytest_configure(config):
    for marker in ("requires_trainable_backend", "multi_device", "large"):
        config.addinivalue_line("markers", f"{marker}: Keras' own marker")


def _excluded(nodeid: str, patterns: list[str]) -> bool:
    return any(nodeid == p or (p.endswith("*") and nodeid.startswith(p[:-1]))
               for p in patterns)


def pytest_collection_modifyitems(config, items):
    # Tests differences.toml excludes (they need what is not installed).
    patterns = json.loads(os.environ.get("CUSTOMFIT_CONFORMANCE_EXCLUDED", "[]"))
    kept = [item for item in items if not _excluded(item.nodeid, patterns)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if item not in kept])
        items[:] = kept
    # Keras' conftest skips multi-device tests without several devices (it
    # counts them on JAX only).
    if keras.backend.backend() == "jax":
        import jax

        if jax.device_count() > 1:
            return
    skip = pytest.mark.skip(reason="Requires multiple devices")
    for item in items:
        if "multi_device" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"model base: {conformance_base.BASE} ({conformance_base.Model})"


def _record(nodeid: str, outcome: str) -> None:
    # A failure in setup, call or teardown fails the test; a skip anywhere
    # before the call skips it.
    if _OUTCOMES.get(nodeid) in ("failed", "error"):
        return
    _OUTCOMES[nodeid] = outcome


def pytest_runtest_logreport(report):
    if report.failed:
        _record(report.nodeid, "failed" if report.when == "call" else "error")
    elif report.skipped:
        _record(report.nodeid, "skipped")
        if isinstance(report.longrepr, tuple):
            _SKIP_REASONS[report.nodeid] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.when == "call":
        _record(report.nodeid, "passed")


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid, "error")


def pytest_sessionfinish(session):
    path = os.environ.get("CUSTOMFIT_CONFORMANCE_OUTCOMES")
    if path and not hasattr(session.config, "workerinput"):
        with open(path, "w") as f:
            json.dump({"outcomes": _OUTCOMES, "skip_reasons": _SKIP_REASONS}, f,
                      indent=0, sort_keys=True)

