"""keras.distribution.ModelParallel over four CPU devices (a 2x2 mesh, `batch`
by `model`; a subprocess, since the device count is fixed when JAX starts):
CustomModel trains like keras.Model, bit for bit, and leaves the variables
laid out as the LayoutMap says. The script: tests/jax_backend/model_parallel.py."""

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "model_parallel.py")
# What keras.Model reports, compared with CustomModel's run.
COMPARED = ("history", "weights", "optimizer", "evaluate", "predict")


@pytest.fixture(scope="module")
def runs():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def laid_out(layouts, path):
    """The spec the LayoutMap gives `path` (its keys are regular
    expressions, searched), or None: replicated."""
    matches = [axes for key, axes in layouts.items() if re.search(key, path)]
    assert len(matches) <= 1, path
    return matches[0] if matches else None


def without(logs, names):
    return {key: value for key, value in logs.items()
            if not any(name in key for name in names)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_custom_model_equals_stock_under_model_parallel(runs):
    assert runs["devices"] == 4
    for name in COMPARED:
        assert runs["custom"][name] == runs["stock"][name], name
    assert runs["custom"]["layouts"] == runs["stock"]["layouts"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compute_loss_hook_and_log_under_model_parallel(runs):
    """compute_loss adds a penalty on the sharded hidden kernel: equal to
    keras.Model with the same override; `log` reports over the whole batch."""
    penalized, stock = runs["penalized"], runs["stock_penalized"]
    logged = ("penalty", "twice_loss")
    assert penalized["history"].keys() - stock["history"].keys() == {
        "penalty", "twice_loss", "val_penalty", "val_twice_loss"}
    assert without(penalized["history"], logged) == stock["history"]
    assert without(penalized["evaluate"], logged) == stock["evaluate"]
    for name in ("weights", "optimizer", "predict"):
        assert penalized[name] == stock[name], name
    history = penalized["history"]
    assert history["twice_loss"] == [2 * v for v in history["loss"]]
    assert history["val_twice_loss"] == [2 * v for v in history["val_loss"]]
    assert all(v > 0 for v in history["penalty"] + history["val_penalty"])
    # The penalty is in the loss: the runs differ from the plain ones.
    assert penalized["weights"] != runs["custom"]["weights"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["custom", "penalized"])
def test_variables_stay_laid_out_after_fit(runs, run):
    """After fit, each variable is split over the mesh's `model` axis as the
    LayoutMap says (replicated where it says nothing), its shards have the
    split shape, and Adam's moments are laid out as their variable."""
    layouts, mesh = runs["layouts"], {"batch": 2, "model": 2}
    found = runs[run]["layouts"]
    assert {"hidden/kernel", "hidden/bias", "norm/gamma", "norm/moving_mean",
            "head/kernel", "head/bias", "dropout/seed"} <= found.keys()
    for path, layout in found.items():
        expected = laid_out(layouts, path)
        assert layout["mesh"] == mesh, path
        if expected is None:
            assert set(layout["spec"]) == {None}, path
        else:
            assert layout["spec"] == expected, path
    assert found["hidden/kernel"]["shards"] == [[64, 16]]
    assert found["head/kernel"]["shards"] == [[16, 10]]
    assert found["norm/moving_variance"]["shards"] == [[16]]
    assert found["head/bias"]["shards"] == [[10]]
    for momentum, velocity, variable in runs[run]["moments"]:
        assert momentum == velocity == variable
