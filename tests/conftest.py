import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest
from sklearn.datasets import load_digits

from tests.subproc import SHARED_DIRECTORY

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    # The tests of the JAX backend run with KERAS_BACKEND=jax
    # (`nox -s jax`), in an environment without TensorFlow.
    collect_ignore = ["jax_backend"]
if keras.backend.backend() != "torch":
    # With KERAS_BACKEND=torch, in an environment with torch.
    collect_ignore = [*globals().get("collect_ignore", []), "torch_backend"]


def pytest_configure(config):
    # Installed (pip install -e .), the package's pytest11 entry point has
    # already loaded the plugin; from a bare checkout, load it here.
    import customfit.pytest_plugin as plugin

    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "customfit")
    # One directory for the whole run (`run_python_once`), made before
    # pytest-xdist starts its workers, which inherit the variable.
    if not hasattr(config, "workerinput") and SHARED_DIRECTORY not in os.environ:
        config._customfit_shared = tempfile.mkdtemp(prefix="customfit-tests-")
        os.environ[SHARED_DIRECTORY] = config._customfit_shared


def pytest_unconfigure(config):
    shared = getattr(config, "_customfit_shared", None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        del os.environ[SHARED_DIRECTORY]


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 handwritten digits: x in [0, 1], y in 0..9."""
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    return x, y


@pytest.fixture(autouse=True)
def seeded(customfit_deterministic):
    """Op determinism refuses unseeded random ops: seed every test (with the
    fixture the package gives its users)."""
    return customfit_deterministic


@pytest.fixture
def mixed_float16():
    """The mixed_float16 global policy for one test, float32 afterwards."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")
