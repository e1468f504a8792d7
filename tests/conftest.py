import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

tf.config.experimental.enable_op_determinism()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 handwritten digits: x in [0, 1], y in 0..9."""
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    return x, y


@pytest.fixture(autouse=True)
def seeded():
    """Op determinism refuses unseeded random ops: seed every test."""
    import keras

    keras.utils.set_random_seed(0)
