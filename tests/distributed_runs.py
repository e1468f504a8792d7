"""The same short trainings under any strategy, for comparing a distributed
run with a single-device one. Imported by worker processes."""

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import customfit
from tests import models

BASES = {
    "default": customfit.CustomModel,
    "every_hook": models.every_hook(customfit.CustomModel),
}


def digits(n_train=256, n_val=128):
    data = load_digits()
    x, y = (data.data / 16).astype("float32"), data.target.astype("int32")
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_val],
                                        y[n_train:n_train + n_val])


def train(base, strategy: tf.distribute.Strategy, epochs=2) -> dict:
    """fit (shuffled, with validation) and evaluate; JSON-ready results."""
    (x, y), validation = digits()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.mlp(base, dropout=0)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=epochs, validation_data=validation,
                        verbose=0).history
    evaluation = model.evaluate(*validation, batch_size=64, verbose=0, return_dict=True)
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "evaluation": {k: float(v) for k, v in evaluation.items()},
        "weights": [w.tolist() for w in model.get_weights()],
    }


def assert_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    assert actual["history"].keys() == expected["history"].keys()
    for key in expected["history"]:
        np.testing.assert_allclose(actual["history"][key], expected["history"][key],
                                   rtol=rtol, atol=atol, err_msg=key)
    assert actual["evaluation"].keys() == expected["evaluation"].keys()
    for key in expected["evaluation"]:
        np.testing.assert_allclose(actual["evaluation"][key], expected["evaluation"][key],
                                   rtol=rtol, atol=atol, err_msg=key)
    for i, (a, e) in enumerate(zip(actual["weights"], expected["weights"], strict=True)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"weight #{i}")
