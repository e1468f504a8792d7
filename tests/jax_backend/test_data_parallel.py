"""keras.distribution.DataParallel over two CPU devices (a subprocess, since
the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "data_parallel.py")


@pytest.fixture(scope="module")
def runs():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
def test_custom_model_equals_stock_on_two_devices(runs):
    assert runs["devices"] == 2
    assert "NamedSharding" in runs["custom"]["kernel_sharding"]
    assert runs["custom"]["history"] == runs["stock"]["history"]
    assert runs["custom"]["weights"] == runs["stock"]["weights"]
    assert runs["custom"]["evaluate"] == runs["stock"]["evaluate"]


@pytest.mark.multiprocess
def test_log_and_a_second_optimizer_on_two_devices(runs):
    """Two Adams with equal settings update as one: equal to stock; `log`
    reports over the whole (sharded) batch."""
    logged, stock = runs["logged"], runs["stock"]
    assert logged["weights"] == stock["weights"]
    history = logged["history"]
    assert history["twice_loss"] == [2 * v for v in history["loss"]]
    assert history["val_twice_loss"] == [2 * v for v in history["val_loss"]]
