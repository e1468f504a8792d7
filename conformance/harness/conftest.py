"""pytest configuration for Keras' rewritten tests: Keras' markers, and a
record of every test's outcome for `conformance/run.py` to compare."""

import json
import os

import pytest

import conformance_base

_OUTCOMES: dict[str, str] = {}


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
    # Keras' conftest skips multi-device tests without several devices.
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
    elif report.when == "call":
        _record(report.nodeid, "passed")


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid, "error")


def pytest_sessionfinish(session):
    path = os.environ.get("CUSTOMFIT_CONFORMANCE_OUTCOMES")
    if path and not hasattr(session.config, "workerinput"):
        with open(path, "w") as f:
            json.dump(_OUTCOMES, f, indent=0, sort_keys=True)

